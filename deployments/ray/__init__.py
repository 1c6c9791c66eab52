"""Scale-out on Ray Serve: engine replicas behind a LoRA-aware router."""
