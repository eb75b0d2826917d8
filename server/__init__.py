"""tinyfleet.server: the coordinator daemon.

Map (one idea per module):
  daemon          lifecycle: gRPC + HTTP on one asyncio loop, job thread, server.json, stop
  fleet_service   Fleet gRPC: Register, Connect (agent streams), GetArtifact
  admin_service   Admin gRPC: jobs and devices for operators (admin token)
  connections     ConnectionHub: who is connected; thread-safe sending and waiting
  fleet_grid      FleetGrid: Flower's Grid over connected agents, reply validation
  job_runner      the round loop: quorum, deadlines, drops, checkpoints, resume
  job_strategy    job file -> Flower strategy, configs, initial model
  job_events      job change notifications for WatchJob
  job_json        how jobs/devices look on the wire, over HTTP and in the CLI
  group_runner    concurrent callers' items handled in groups (group commit, group validation)
  http/           every HTTP route: JSON API, auth answers, SPARQL, WoT directory, imports
  descriptions    device description check (hook the registry replaces)
  auth            credentials, node ids, admin token
  schema, database, migrations/, repository   SQL state (SQLAlchemy 2 + Alembic)
  artifacts       content-addressed blob store
  admin_client    the Admin gRPC client the CLIs share
  cli, job_cli    `tinyfleet server ...` and `tinyfleet job ...`
"""
