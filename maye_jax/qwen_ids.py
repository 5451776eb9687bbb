"""The Qwen2-VL / Qwen2.5-VL special token ids every part of the project agrees on.

Imports nothing (the torch-side worker, the tokenizer, the trainer, the sampler, the models and
the tiny test models all read them here: the one place they are written). The ids are those of
the released Qwen2 vocabulary: 151,643 BPE tokens, then the special tokens.
"""

NUM_BPE_TOKENS = 151643  # the BPE ranks are ids 0 .. NUM_BPE_TOKENS - 1; the specials follow
ENDOFTEXT_ID = 151643  # <|endoftext|>: the first special token, also the padding token
IM_START_ID = 151644  # <|im_start|>
IM_END_ID = 151645  # <|im_end|>: the end of a chat turn (EOS of a response)
VISION_START_ID = 151652  # <|vision_start|>
VISION_END_ID = 151653  # <|vision_end|>
IMAGE_PAD_ID = 151655  # <|image_pad|>: one per merged image patch in a prompt
VIDEO_PAD_ID = 151656  # <|video_pad|>

PAD_ID = ENDOFTEXT_ID
STOP_TOKEN_IDS = (IM_END_ID, ENDOFTEXT_ID)  # a response ends at the first of these (kept)
