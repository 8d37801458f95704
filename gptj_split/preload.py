"""Notebooks 05 to 07: what the fork server of processes.process_context imports before it forks any CPU stage or rank
process. Importing this module does that work (only that server imports it): the helpers that run a stage or a rank,
and transformers' GPT-J module through gptj_modeling, which silences torchao's import-time log lines.
"""

import accelerate.utils  # noqa: F401
import safetensors.torch  # noqa: F401
import transformers.masking_utils  # noqa: F401

from . import pipeline, tensor_parallel  # noqa: F401
from .models import gptj_modeling

gptj_modeling()
