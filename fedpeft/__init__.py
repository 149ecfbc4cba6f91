"""fedpeft: federated PEFT simulation on Flower + Ray with transformers and peft."""

__version__ = "0.1.0"
