"""Docker images, compose, Swarm and Kubernetes manifests (the container tier)."""
