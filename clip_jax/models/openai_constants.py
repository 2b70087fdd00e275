"""The numbers OpenAI's CLIP fixed once, named here and imported everywhere else.

The architecture table, the default model options, the BPE tokenizer, the converters
and the choice of a model's tokenizer all read these; no other module spells them.
"""

from __future__ import annotations

import math

# CLIP's byte-level BPE: 256 byte tokens, 256 end-of-word byte tokens, 48,894 merges
# and the two special tokens, in that order (so end-of-text is the largest id).
VOCAB_SIZE = 49408
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
CONTEXT_LENGTH = 77

# The learnable log temperature starts at ln(1 / 0.07) (the paper's tau = 0.07) and is
# kept at or below ln 100 (a temperature of at most 100).
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)
