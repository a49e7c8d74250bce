"""Kubernetes operator: FineTuneJob → KubeRay RayJob."""
