"""Offline tools above the serving runtime and the client: the `codecsight` command, the
scene generator, training, evaluation and benchmarks.

Import direction: `codecsight.tools` -> `codecsight_client` -> `codecsight` (the runtime).
The runtime never imports the client or the tools.
"""
