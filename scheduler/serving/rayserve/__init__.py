"""The cloud on Ray Serve: a deployment of the cloud engine (replica.py) and the ZeroMQ gateway's side of it
(gateway.py), for when one machine is not enough.

    edges --ZeroMQ--> gateway (latentwire cloud --ray: CloudServer with a RayEngine; CURVE and every limit)
                         | one streaming DeploymentHandle call per session, routed by Serve to the replica
                         v with the fewest requests in flight (power of two choices)
                      CloudReplica x N (each: one model and its own CloudEngine, step-level batching inside)

Ray is an optional extra (``pip install latentwire[ray]``): only this package imports it, and nothing
imports this package but ``latentwire cloud --ray`` and a serving stack that chooses to.
"""
