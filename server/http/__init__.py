"""The coordinator's HTTP surface: JSON API, SPARQL 1.1 Protocol, WoT Discovery directory, imports."""
