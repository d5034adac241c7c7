"""CLIP ViT weights -> mPLUG's image tower (`mplug.import_open_clip_vision`): a small random
open_clip CLIP vision tower, converted, gives the same tokens as open_clip's own forward."""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from simvlm_jax.models import mplug

torch = pytest.importorskip("torch")

from test_open_clip_parity import _import_open_clip  # noqa: E402  pylint: disable=wrong-import-position

CFG = mplug.MPLUGConfig(vocab_size=64, image_size=32, patch_size=8, vision_width=48, vision_layers=2,
                        vision_heads=3, vision_mlp_dim=96, text_width=48, text_heads=3, text_mlp_dim=96,
                        text_layers=1, fusion_layers=2, fusion_stride=1, decoder_layers=1, embed_dim=16,
                        max_text_len=6, max_target_len=5, max_prefix_len=3, mask_id=63)


def _open_clip_vit(width=48, layers=2, patch=8):
    open_clip = _import_open_clip()
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=24, vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=layers, width=width, head_width=16, mlp_ratio=2.0, patch_size=patch, image_size=32,
            output_tokens=True),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
        quick_gelu=True)
    with torch.no_grad():  # move every LayerNorm / bias off its trivial init
        for p in model.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_clip_vision_tower_matches_open_clip():
    model = _open_clip_vit()
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    fam = mplug.MPLUGFamily(CFG)
    params = nn.meta.unbox(fam.init_params(jax.random.key(0)))
    params = mplug.import_open_clip_vision(params, sd, CFG)
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)  # already normalized
    ours = np.asarray(fam.module.apply({"params": params}, images, method=mplug.MPLUG.encode_image))
    with torch.no_grad():
        pooled, tokens = model.visual(torch.from_numpy(images).permute(0, 3, 1, 2))
    np.testing.assert_allclose(ours[:, 1:], tokens.numpy(), rtol=1e-4, atol=1e-4)
    proj = sd["visual.proj"]
    np.testing.assert_allclose(ours[:, 0] @ proj, pooled.numpy(), rtol=1e-4, atol=1e-4)


def test_a_mismatched_vision_config_is_named():
    sd = {k: v.detach().numpy() for k, v in _open_clip_vit(width=64, layers=2).state_dict().items()}
    params = nn.meta.unbox(mplug.MPLUGFamily(CFG).init_params(jax.random.key(0)))
    with pytest.raises((ValueError, KeyError), match="vision"):
        mplug.import_open_clip_vision(params, sd, CFG)
