"""Named hook points on HookedEncoder: each reads the tensor its TransformerLens name says, edits reach the
output as a hand-written forward pass says they should, and the open_clip adapter composes to open_clip's
own forward. Oracles: open_clip's forward and its submodules called by hand; nothing here reuses the hooks."""

from __future__ import annotations

import pytest
import torch

from dsl_cli.encoder import HookedEncoder
from dsl_cli.encoder import openclip_api
from dsl_cli.encoder.hooked import HOOK_POINTS, head_writes

TOL = dict(atol=1e-5, rtol=1e-5)


def manual_forward(visual, pixels, edit=None):
    """open_clip's block arithmetic written out, with `edit(layer, point, x)` applied at each point:
    the oracle every hook point is checked against. -> (embedding [B, E], {name: activation})."""
    edit = edit or (lambda layer, point, x: x)
    seen = {}

    def at(layer, point, x):
        seen[f"blocks.{layer}.{point}"] = x
        return edit(layer, point, x)

    with torch.no_grad():
        x = openclip_api.tokens(visual, pixels)
        for l, block in enumerate(visual.transformer.resblocks):
            x = at(l, "hook_resid_pre", x)
            normed = block.ln_1(x)
            writes = head_writes(block, normed, normed)
            new = at(l, "attn.hook_result", writes)
            attn_out = at(l, "hook_attn_out", block.ls_1(block.attention(q_x=normed)) + (new - writes).sum(2))
            x = at(l, "hook_resid_mid", x + attn_out)
            x = at(l, "hook_resid_post", x + at(l, "hook_mlp_out", block.ls_2(block.mlp(block.ln_2(x)))))
        embedding = openclip_api.pool_cls(visual, x) @ visual.proj
    return embedding, seen


def test_openclip_adapter_pins_the_private_calls(tiny_visual, tiny_pixels):
    """tokens -> every block -> pool_cls -> proj is open_clip's own forward: if a release changes what
    `_embeds` or `_pool` do, this fails (and dsl_cli/encoder/openclip_api.py is the one file to fix)."""
    with torch.no_grad():
        x = openclip_api.tokens(tiny_visual, tiny_pixels)
        assert x.shape == (3, 17, 64)  # CLS + 16 patches, width 64
        for block in tiny_visual.transformer.resblocks:
            x = block(x)
        ours = openclip_api.pool_cls(tiny_visual, x) @ tiny_visual.proj
        torch.testing.assert_close(ours, tiny_visual(tiny_pixels), atol=0, rtol=0)
        torch.testing.assert_close(openclip_api.pool_cls(tiny_visual, x), tiny_visual.ln_post(x[:, 0]), atol=0, rtol=0)


@pytest.mark.parametrize("point", HOOK_POINTS)
def test_every_hook_point_reads_its_tensor(tiny_encoder, tiny_visual, tiny_pixels, point):
    _, expected = manual_forward(tiny_visual, tiny_pixels)
    seen = {}
    names = [f"blocks.{l}.{point}" for l in range(tiny_encoder.n_layers)]
    tiny_encoder.run_with_hooks(tiny_pixels, {n: lambda x, hook: seen.__setitem__(hook.name, x.clone()) for n in names})
    for name in names:
        torch.testing.assert_close(seen[name], expected[name], **TOL)
    cache = tiny_encoder.run_with_cache(tiny_pixels)  # the cache holds the same tensors at the CLS row
    if point != "attn.hook_result":
        torch.testing.assert_close(cache[names[2]], expected[names[2]][:, 0], **TOL)


def test_hook_points_are_listed_in_the_order_they_fire(tiny_encoder, tiny_pixels):
    """HOOK_POINTS says it lists a block's points in firing order (the MLP reads hook_resid_mid, so that
    fires before hook_mlp_out): each block's hooks, recorded as they fire, come in that order."""
    fired = []
    tiny_encoder.run_with_hooks(tiny_pixels, {f"blocks.{l}.{p}": lambda x, hook: fired.append(hook.name)
                                              for l in range(tiny_encoder.n_layers) for p in HOOK_POINTS})
    assert fired == [f"blocks.{l}.{p}" for l in range(tiny_encoder.n_layers) for p in HOOK_POINTS]


@pytest.mark.parametrize("point", HOOK_POINTS)
def test_every_hook_point_edits_the_pass(tiny_encoder, tiny_visual, tiny_pixels, point):
    """An edit at layer 1 (add a fixed random vector) changes the output exactly as the written-out pass says."""
    g = torch.Generator().manual_seed(0)
    shift = torch.randn(4, 64, generator=g) if point == "attn.hook_result" else torch.randn(64, generator=g)
    edit = lambda layer, p, x: x + shift if (layer, p) == (1, point) else x  # noqa: E731
    expected, _ = manual_forward(tiny_visual, tiny_pixels, edit)
    got = tiny_encoder.run_with_hooks(tiny_pixels, {f"blocks.1.{point}": lambda x, hook: x + shift})
    torch.testing.assert_close(got, expected, **TOL)
    assert not torch.allclose(got, tiny_visual(tiny_pixels).detach(), **TOL)  # the edit did something


def test_hooks_on_every_point_of_one_block_compose_as_the_written_out_pass(tiny_encoder, tiny_visual, tiny_pixels):
    """Every point of block 1 edited in one pass (hook_resid_mid's edit is carried past the MLP by a hook on its
    output, which must not be what a hook_mlp_out function sees): the written-out pass with the same edits."""
    g = torch.Generator().manual_seed(1)
    shifts = {p: torch.randn(4, 64, generator=g) if p == "attn.hook_result" else torch.randn(64, generator=g)
              for p in HOOK_POINTS}
    # affine, not a shift alone: added in either order, shifts would agree with a wrong order too
    expected, _ = manual_forward(tiny_visual, tiny_pixels,
                                 lambda layer, p, x: 1.5 * x + shifts[p] if layer == 1 else x)
    got = tiny_encoder.run_with_hooks(tiny_pixels, {f"blocks.1.{p}": (lambda x, hook, d=d: 1.5 * x + d)
                                                    for p, d in shifts.items()})
    torch.testing.assert_close(got, expected, **TOL)


def test_user_hook_zeroing_an_mlp_is_ablate_hooked(tiny_encoder, tiny_pixels):
    zeroed = tiny_encoder.run_with_hooks(tiny_pixels, {"blocks.1.hook_mlp_out": lambda x, hook: torch.zeros_like(x)})
    assert torch.equal(zeroed, tiny_encoder.ablate_hooked(tiny_pixels, ["L1MLP"]))
    assert not torch.equal(zeroed, tiny_encoder.embed(tiny_pixels))


def test_hooks_are_removed_after_an_error_and_bad_names_refused(tiny_encoder, tiny_pixels):
    clean = tiny_encoder.embed(tiny_pixels)
    with pytest.raises(RuntimeError, match="boom"):
        with tiny_encoder.hooks({"blocks.0.hook_attn_out": lambda x, hook: x * 0}):
            raise RuntimeError("boom")
    torch.testing.assert_close(tiny_encoder.embed(tiny_pixels), clean, atol=0, rtol=0)
    for bad in ("blocks.4.hook_mlp_out", "blocks.0.hook_nothing", "hook_embed", "blocks.0.hook_attn_bias"):
        with pytest.raises(KeyError, match="no hook point"):
            tiny_encoder.run_with_hooks(tiny_pixels, {bad: lambda x, hook: None})
    with pytest.raises(KeyError) as refused:
        tiny_encoder.run_with_hooks(tiny_pixels, {"blocks.4.hook_mlp_out": lambda x, hook: None})
    assert refused.value.args[0] == ("no hook point 'blocks.4.hook_mlp_out': use blocks.<layer 0..3>.<hook_resid_pre | "
                                     "attn.hook_result | hook_attn_out | hook_resid_mid | hook_mlp_out | hook_resid_post>")
    assert isinstance(tiny_encoder, HookedEncoder)


def test_a_hook_on_some_heads_gets_their_writes_and_its_hook_point(tiny_visual, tiny_pixels) -> None:
    """`only_heads([1, 3], fn)` at `blocks.1.attn.hook_result`: fn sees those two heads' writes at every
    token ([B, T, 2, D]; at the CLS token the cache's a_{1,1} and a_{1,3}) and the hook point by its name."""
    from dsl_cli.encoder import only_heads

    enc = HookedEncoder(tiny_visual)
    cache, seen = enc.run_with_cache(tiny_pixels), []

    def read(writes, hook):
        seen.append((hook.name, writes.clone()))

    enc.run_with_hooks(tiny_pixels, {"blocks.1.attn.hook_result": only_heads([1, 3], read)})
    ((name, writes),) = seen
    assert name == "blocks.1.attn.hook_result" and writes.shape == (3, 17, 2, enc.d_model)
    torch.testing.assert_close(writes[:, 0], cache.head_writes[:, 1, [1, 3]], atol=1e-5, rtol=1e-5)


def test_an_unknown_ablation_is_refused_naming_the_known_ones(tiny_visual, tiny_pixels) -> None:
    with pytest.raises(ValueError) as refused:
        HookedEncoder(tiny_visual).ablate_hooked(tiny_pixels, ["L1H1"], how="half")
    assert str(refused.value) == "unknown ablation 'half': use one of zero, mean"
