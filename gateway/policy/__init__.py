"""The policy directory (policies/) as data: each file loaded, checked and turned into the
objects that decide (the catalog, the Casbin policy, the retention rules, the export
sources, the erasers, the alert rules), and the whole set versioned (policyset.py).

Nothing here imports the request path, the features or the wiring: they import it
(tests/test_import_graph.py)."""
