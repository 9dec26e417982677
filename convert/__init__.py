"""dpkit-convert: policies trained elsewhere (lerobot, the original diffusion_policy) -> dpkit run folders.

    dpkit-convert path/to/pretrained_model --out runs/lerobot_pusht      # or path/to/latest.ckpt
    dpkit-export runs/lerobot_pusht --out bundles/lerobot_pusht

A converter is a translation table onto dpkit's one model (dpkit.train.policy): tensor names, the
normalization statistics and the observation layout are mapped; anything the model cannot represent
exactly is refused with the source's config field and value.
"""
