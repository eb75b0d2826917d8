"""tinyfleet on a stock Flower deployment: the ServerApp and ClientApp components of this Flower App."""
