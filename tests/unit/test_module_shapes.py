"""peft's ``rank_pattern`` / ``alpha_pattern`` keys for global adapters with a rank per module: each
key matches its own module only, under peft's own lookup (the adapters on real models:
tests/app/test_module_shapes.py)."""

from fedpeft.models import pattern_key

# --- exact keys --------------------------------------------------------------------------------


def peft_matches(key: str, name: str) -> bool:
    """Whether peft's own lookup (``peft.utils.other.get_pattern_key``) picks ``key`` for ``name``."""
    from peft.utils.other import get_pattern_key

    return get_pattern_key([key], name) == key


def test_pattern_keys_match_their_module_only():
    names = [f"model.layers.{l}.{p}" for l in range(30) for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")]
    names += ["lm_head", "model.layers.1.self_attn.q_proj.base_layer", "wrapper.model.layers.1.self_attn.q_proj", "modelxlayersx1xself_attnxq_proj"]
    for n in names:
        assert [m for m in names if peft_matches(pattern_key(n), m)] == [n]
    # what peft would do with the bare name: "." matches any character, and any dotted prefix is accepted
    assert peft_matches("model.layers.1.self_attn.q_proj", "modelxlayersx1xself_attnxq_proj")
    assert peft_matches("model.layers.1.self_attn.q_proj", "wrapper.model.layers.1.self_attn.q_proj")
