import dataclasses
import math
import re
import subprocess
import sys

import pytest
import torch

from mtnlg_ray.errors import InputError
from mtnlg_ray.model import GPT, PRESETS, build_on_meta, lm_loss, pad_vocab
from mtnlg_ray.model.generate import SamplingParams, generate


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(PRESETS["tiny"]).eval()


def full_recompute_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_changing_a_later_token_never_changes_earlier_logits(model):
    torch.manual_seed(1)
    x = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        base = model(x)
        for t in (5, 20, 39):
            y = x.clone()
            y[:, t] = (y[:, t] + 7) % model.config.vocab_size
            changed = model(y)
            assert torch.equal(changed[:, :t], base[:, :t])
            assert not torch.allclose(changed[:, t], base[:, t])


def test_kv_cache_greedy_equals_full_recompute_for_ragged_batch(model):
    prompts = [[3, 1, 4, 1, 5], [9], [2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2]]
    results = generate(model, prompts, SamplingParams(max_tokens=30, temperature=0))
    for prompt, result in zip(prompts, results):
        assert result.tokens == full_recompute_greedy(model, prompt, 30)
        assert result.finish_reason == "length"


def test_a_short_row_keeps_its_own_context_beside_a_long_one(model):
    """Each row generates until its own context is full, whatever the longest prompt in the batch."""
    seq_len = model.config.seq_len
    long, short = list(range(1, seq_len - 27)), [5, 6, 7, 8, 9]
    params = SamplingParams(max_tokens=60, temperature=0)
    together = generate(model, [long, short], params)
    alone = [generate(model, [prompt], params)[0] for prompt in (long, short)]
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert len(together[0].tokens) == seq_len - len(long) + 1 and together[0].finish_reason == "length"
    assert len(together[1].tokens) == 60
    assert together[1].tokens == full_recompute_greedy(model, short, 60)


def test_inference_layout_changes_memory_order_only(model):
    from mtnlg_ray.model.gpt import inference_layout

    laid_out = GPT(model.config).eval()
    laid_out.load_state_dict(model.state_dict())
    inference_layout(laid_out)
    assert not laid_out.blocks[0].mlp.fc1.weight.is_contiguous()  # it did change the layout
    assert not laid_out.tok_emb.weight.is_contiguous()
    x = torch.randint(0, model.config.vocab_size, (2, 17))
    with torch.no_grad():
        assert torch.allclose(laid_out(x), model(x), atol=1e-5)
        assert torch.allclose(model(x, last_only=True), model(x)[:, -1:], atol=1e-6)
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    params = SamplingParams(max_tokens=20, temperature=0)
    assert [r.tokens for r in generate(laid_out, prompts, params)] == [r.tokens for r in generate(model, prompts, params)]


def test_greedy_and_sampled_rows_decode_together(model):
    greedy = SamplingParams(max_tokens=15, temperature=0)
    sampled = SamplingParams(max_tokens=15, temperature=0.8, seed=5)
    mixed = generate(model, [[4, 5, 6], [4, 5, 6]], [greedy, sampled])
    assert mixed[0].tokens == generate(model, [[4, 5, 6]], greedy)[0].tokens
    assert mixed[1].tokens == generate(model, [[4, 5, 6]], sampled)[0].tokens


def test_seeded_sampling_does_not_depend_on_the_rest_of_the_batch(model):
    params = SamplingParams(max_tokens=25, temperature=0.9, top_k=40, top_p=0.95, seed=11)
    alone = generate(model, [[7, 8, 9]], params)[0].tokens
    together = generate(model, [[1, 2], [7, 8, 9], [5] * 9], params)[1].tokens
    again = generate(model, [[7, 8, 9]], params)[0].tokens
    other_seed = generate(model, [[7, 8, 9]], dataclasses.replace(params, seed=12))[0].tokens
    assert alone == together == again
    assert alone != other_seed


def test_every_64_bit_seed_is_its_own_draw_and_wider_seeds_are_refused(model):
    """Seeds were taken mod 2**63: -1 gave 2**63 - 1's text and 2**63 gave 0's. Now a seed is its 64 bits,
    signed or unsigned (2**64 - 1 is -1's bits)."""
    params = SamplingParams(max_tokens=25, temperature=1.5)

    def text(seed: int) -> tuple:
        return tuple(generate(model, [[7, 8, 9]], dataclasses.replace(params, seed=seed))[0].tokens)

    assert len({text(seed) for seed in (-1, 2**63 - 1, 0, -(2**63))}) == 4
    assert text(2**64 - 1) == text(-1) and text(2**63) == text(-(2**63))
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(InputError, match=r"^seed: expected a 64-bit integer"):
            SamplingParams(seed=seed)


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, [[4, 2]], SamplingParams(max_tokens=15, temperature=0))[0].tokens
    top1 = generate(model, [[4, 2]], SamplingParams(max_tokens=15, temperature=1.5, top_k=1, seed=0))[0].tokens
    nucleus = generate(model, [[4, 2]], SamplingParams(max_tokens=15, temperature=1.0, top_p=1e-6, seed=0))[0].tokens
    assert greedy == top1 == nucleus


def test_generation_stops_at_eos_and_never_samples_vocab_padding(model):
    greedy = generate(model, [[10, 11]], SamplingParams(max_tokens=10, temperature=0))[0].tokens
    eos = greedy[3]
    stopped = generate(model, [[10, 11]], SamplingParams(max_tokens=10, temperature=0), eos_id=eos)[0]
    assert stopped.tokens == greedy[: greedy.index(eos) + 1]
    assert stopped.finish_reason == "stop"
    limited = generate(model, [[1]], SamplingParams(max_tokens=200, temperature=2.0, seed=3), vocab_limit=100)[0]
    assert max(limited.tokens) < 100


def test_generation_stops_when_the_context_is_full(model):
    prompt = list(range(1, model.config.seq_len - 5))
    result = generate(model, [prompt], SamplingParams(max_tokens=50, temperature=0))[0]
    # The last sampled token never enters the cache, so prompt + output may reach seq_len + 1.
    assert len(prompt) + len(result.tokens) == model.config.seq_len + 1
    assert result.finish_reason == "length"


def test_prompt_longer_than_context_is_a_user_error(model):
    with pytest.raises(InputError, match="context of 128"):
        generate(model, [list(range(200))], SamplingParams(max_tokens=4))


def test_init_std_follows_mtnlg():
    config = PRESETS["small"]
    model = GPT(config)
    std = model.blocks[0].mlp.fc1.weight.std().item()
    assert abs(std - math.sqrt(1 / (3 * config.d_model))) < 0.01 * std
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    assert torch.all(model.ln_f.weight == 1)


def test_embeddings_are_tied_and_vocab_is_padded():
    assert pad_vocab(50257) == 50304 and pad_vocab(512) == 512 and pad_vocab(513) == 576
    model = GPT(PRESETS["tiny"])
    names = [n for n, _ in model.named_parameters()]
    assert not any("lm_head" in n for n in names)
    x = torch.randint(0, 100, (1, 4))
    with torch.no_grad():
        logits = model(x)
        expected = model.hidden_states(x) @ model.tok_emb.weight.T
    assert torch.allclose(logits, expected, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = GPT(PRESETS["tiny"])
    recompute = GPT(dataclasses.replace(PRESETS["tiny"], activation_checkpointing=True))
    recompute.load_state_dict(plain.state_dict())
    x = torch.randint(0, 2048, (2, 33))
    grads = []
    for m in (plain, recompute):
        m.train()
        lm_loss(m(x[:, :-1]), x[:, 1:]).backward()
        grads.append(m.blocks[1].mlp.fc1.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_large_presets_build_on_meta_with_paper_sizes():
    assert abs(build_on_meta(PRESETS["mtnlg-530b"]).num_parameters() / 529.6e9 - 1) < 0.005
    assert abs(build_on_meta(PRESETS["gpt3-175b"]).num_parameters() / 175e9 - 1) < 0.01
    assert abs(build_on_meta(PRESETS["gpt3-125m"]).num_parameters() / 125e6 - 1) < 0.02
    assert 0.8e6 < GPT(PRESETS["tiny"]).num_parameters() < 1.3e6
    assert 10e6 < GPT(PRESETS["small"]).num_parameters() < 20e6


def test_model_package_does_not_import_ray_or_distributed():
    code = (
        "import sys, mtnlg_ray.model, mtnlg_ray.model.generate;"
        "bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    from pathlib import Path

    import mtnlg_ray.model as pkg

    imports = re.compile(r"^\s*(from|import)\s+(ray\b|torch\.distributed)", re.MULTILINE)
    for source in Path(pkg.__file__).parent.glob("*.py"):
        assert not imports.search(source.read_text()), source
