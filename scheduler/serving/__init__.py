"""Serving a plan over ZeroMQ: the cloud daemon (a front end of the engine in latentwire.scheduler.engine),
its broker and worker pool, the edge client, CURVE keys, link emulation, and starting daemons as child
processes. Everything that executes a plan lives one folder up and opens no socket."""
