"""The ClientApp each SuperNode runs: tinyfleet's built-in handlers, data from `--node-config data=...`."""

from tinyfleet.client.flower_clientapp import make_client_app

app = make_client_app()
