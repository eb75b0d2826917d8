"""The ServerApp: the tinyfleet job named by run-config `job`, on the grid Flower provides."""

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from tinyfleet.server.flower_serverapp import job_from_run_config, make_server_app

APP_DIR = Path(__file__).resolve().parent.parent

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # The job is chosen per run (`--run-config job=...`), so the ServerApp is built here.
    spec = job_from_run_config(context.run_config, APP_DIR)
    make_server_app(spec)(grid, context)
