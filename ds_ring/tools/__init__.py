"""Tools for people at a terminal: the ``ds-ring`` CLI, the demo, the benchmark runner and the local spawner
(``spawn_local``) that tests and the demo use.

Imports: any layer below.
"""
