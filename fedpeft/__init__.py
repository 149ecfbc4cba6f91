"""fedpeft: federated PEFT simulation on Flower + Ray with transformers and peft."""

import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"

# Noise that every process (the driver and each Ray worker) would print and no user can act on:
# torch 2.13's own torch.utils.mkldnn uses its deprecated torch.jit.script_method; bitsandbytes' CPU
# backend warns at import that an optional kernel from the Hugging Face hub is not installed; and
# Flower's Ray actors log a WARNING "Manually terminating ClientAppActor" when a run ends normally.
_warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning)
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
_logging.getLogger("flwr").addFilter(lambda record: not str(record.msg).startswith("Manually terminating"))
