"""Model packages and inference: manifest, registry (versions, activation), ensemble, runner."""
