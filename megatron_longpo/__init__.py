"""megatron-longpo: long-context preference optimisation on Megatron-Core."""

from megatron_longpo import megatron_import as _megatron_import

__version__ = "0.1.0"

_megatron_import.install()  # megatron.core's import without torch.compile's compiler stack (see there)
