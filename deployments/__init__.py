"""Deployments: where and how the service runs beyond one local process (Ray Serve,
ZeroGPU), and getting files in (uploads, URL and Hub downloads)."""
