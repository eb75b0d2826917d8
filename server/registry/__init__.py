"""tinyfleet.server.registry: the semantic fleet registry (RDF store, validation, SPARQL, WoT directory)."""
