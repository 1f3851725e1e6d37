"""The engine on tiny seeded models: exact agreement with HF `generate`, sampling, bad input."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafleet.engine.async_engine import AsyncEngine
from lorafleet.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from lorafleet.engine.llm_engine import LLMEngine
from lorafleet.engine.request import FinishReason, InvalidRequest, SamplingParams

TEXTS = [
    "The quick brown",
    "a",
    "Serving many adapters over one base model keeps the matmuls wide.",
    "Continuous batching lets requests join and leave at every step. The quick brown fox jumps",
    "日本語 🚀",
    "over the lazy dog",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)

LAYOUTS = {
    "roomy": dict(cache=CacheConfig(block_size=16, kv_cache_bytes=4 << 20)),
    "chunked": dict(cache=CacheConfig(block_size=4, kv_cache_bytes=4 << 20), scheduler=SchedulerConfig(7, 4)),
    # 40 blocks x 4 tokens cannot hold all six requests at once: preemption and recompute.
    "preempting": dict(
        cache=CacheConfig(block_size=4, kv_cache_bytes=40 * 4 * 2 * 2 * 2 * 16 * 4),
        scheduler=SchedulerConfig(64, 8, admission_watermark=0.0),
    ),
    # n-gram drafts verified in the step, some kept and some not, across block boundaries.
    "speculative": dict(
        cache=CacheConfig(block_size=4, kv_cache_bytes=4 << 20),
        scheduler=SchedulerConfig(64, 8, num_speculative_tokens=3, speculative_max_seqs=8),
    ),
}


def engine_for(model_dir, **kw) -> LLMEngine:
    kw.setdefault("max_model_len", 160)
    return LLMEngine(EngineConfig(model=str(model_dir), **kw), model_dir=model_dir)


def hf_greedy(model_dir, prompts, max_new_tokens, dtype=torch.float32):
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    outs = []
    for p in prompts:
        ids = hf.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False)[0, len(p) :]
        outs.append(ids.tolist())
    return outs


@pytest.mark.parametrize("attention", ["native", "torch"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_equals_hf_generate_one_prompt_at_a_time(tiny_model_dir, layout, attention, monkeypatch):
    monkeypatch.setenv("LORAFLEET_NATIVE", "1" if attention == "native" else "0")
    eng = engine_for(tiny_model_dir, **LAYOUTS[layout])
    assert eng.runner.native_decode is (attention == "native")
    prompts = [eng.tokenizer.encode(t) for t in TEXTS]
    outs = eng.generate(prompts, GREEDY)
    reference = hf_greedy(tiny_model_dir, prompts, GREEDY.max_tokens)
    for text, out, ref in zip(TEXTS, outs, reference):
        assert out.token_ids == ref, f"prompt {text!r}"
        assert out.finish_reason is (
            FinishReason.STOP if len(ref) < GREEDY.max_tokens else FinishReason.LENGTH
        )
    if layout == "preempting":
        assert eng.kv.num_blocks == 40 and eng.scheduler.num_preemptions > 0
    if layout == "speculative":
        s = eng.scheduler
        assert 0 < s.num_accepted_tokens < s.num_draft_tokens, "drafts were all kept or all refused"
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


@pytest.mark.parametrize("block_size", [4, 16])
def test_prompts_sharing_a_prefix_reuse_its_kv_and_equal_hf(tiny_model_dir, block_size):
    cache = CacheConfig(block_size=block_size, kv_cache_bytes=4 << 20)
    eng = engine_for(tiny_model_dir, cache=cache, max_model_len=256)
    system = eng.tokenizer.encode("You are a helpful assistant who answers briefly and well.")
    prompts = [system + eng.tokenizer.encode(t) for t in TEXTS]
    first = eng.generate(prompts[:1], GREEDY)  # its blocks are cached when it is done
    rest = eng.generate(prompts[1:], GREEDY)
    reference = hf_greedy(tiny_model_dir, prompts, GREEDY.max_tokens)
    for text, out, ref in zip(TEXTS, first + rest, reference):
        assert out.token_ids == ref, f"prompt {text!r}"
    shared = len(system) // block_size * block_size
    # The full blocks of the system prompt are shared, and the start of the block it ends in is
    # copied (the texts part at their first token).
    assert shared >= 16 and all(o.num_cached_tokens >= len(system) for o in rest)
    assert first[0].num_cached_tokens == 0
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    off = engine_for(tiny_model_dir, cache=replace(cache, prefix_caching=False), max_model_len=256)
    assert [o.token_ids for o in off.generate(prompts, GREEDY)] == reference
    assert off.scheduler.num_cached_tokens == 0


def test_prefix_caching_flag():
    from lorafleet.engine.cli import build_parser, engine_config

    assert engine_config(build_parser().parse_args(["engine"])).cache.prefix_caching is True
    args = build_parser().parse_args(["engine", "--no-prefix-caching", "--block-size", "32"])
    assert engine_config(args).cache == CacheConfig(block_size=32, prefix_caching=False)


def test_chat_template_and_text(tiny_llama_dir):
    eng = engine_for(tiny_llama_dir)
    ids = eng.encode_chat([{"role": "user", "content": "The quick brown fox"}])
    assert ids == eng.tokenizer.encode(
        "<|im_start|>user\nThe quick brown fox<|im_end|>\n<|im_start|>assistant\n"
    )
    (out,) = eng.generate([ids], GREEDY)
    assert out.text == eng.tokenizer.decode(out.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision(tiny_llama_dir, dtype):
    eng = engine_for(tiny_llama_dir, dtype=dtype, cache=CacheConfig(kv_cache_bytes=1 << 20))
    fp32 = engine_for(tiny_llama_dir, cache=CacheConfig(kv_cache_bytes=1 << 20))
    assert eng.kv.num_blocks == 2 * fp32.kv.num_blocks  # same byte budget, half the bytes per token
    assert next(eng.runner.model.parameters()).dtype == getattr(torch, dtype)
    prompts = [eng.tokenizer.encode(t) for t in TEXTS]
    half, full = eng.generate(prompts, GREEDY), fp32.generate(prompts, GREEDY)
    first_agree = sum(h.token_ids[:1] == f.token_ids[:1] for h, f in zip(half, full))
    assert first_agree >= len(TEXTS) - 1, "half precision changed the first greedy token of several prompts"


def test_seeded_sampling_is_reproducible_in_any_batch(tiny_llama_dir):
    eng = engine_for(tiny_llama_dir)
    prompt = eng.tokenizer.encode("The quick brown")
    seeded = SamplingParams(max_tokens=16, temperature=1.3, top_p=0.95, top_k=50, seed=1234)
    alone = eng.generate([prompt], seeded)[0].token_ids
    crowd = [eng.tokenizer.encode(t) for t in TEXTS]
    mixed = eng.generate(
        [*crowd, prompt], [SamplingParams(max_tokens=20, temperature=0.9)] * len(crowd) + [seeded]
    )
    assert mixed[-1].token_ids == alone
    other = eng.generate([prompt], SamplingParams(max_tokens=16, temperature=1.3, seed=99))[0].token_ids
    assert other != alone


def test_speculative_decoding_ends_at_the_same_stop_strings_and_lengths(tiny_llama_dir):
    spec = engine_for(tiny_llama_dir, **LAYOUTS["speculative"])
    plain = engine_for(tiny_llama_dir)
    prompts = [plain.tokenizer.encode(t) for t in TEXTS]
    free = plain.generate(prompts, GREEDY)
    # Stop strings from the middle of each output, and lengths that cut through guessed tokens.
    params = [
        SamplingParams(max_tokens=24, temperature=0.0, stop=(o.text[6:9],))
        if len(o.text) > 12
        else SamplingParams(max_tokens=5 + i, temperature=0.0)
        for i, o in enumerate(free)
    ]
    want, got = plain.generate(prompts, params), spec.generate(prompts, params)
    for p, w, g in zip(params, want, got):
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason), p
    assert sum(p.stop != () and w.finish_reason is FinishReason.STOP for p, w in zip(params, want)) >= 2
    assert spec.scheduler.num_accepted_tokens > 0
    assert spec.kv.num_free_blocks == spec.kv.num_blocks


def test_a_stop_string_inside_kept_guesses_drops_the_tokens_after_it(tiny_llama_dir, monkeypatch):
    """A fake model continuing "xyzxyz..." agrees with every guess, so one step gains several
    tokens, and the stop string "zx" ends inside them."""
    outputs = {}
    for layout in ("roomy", "speculative"):
        eng = engine_for(tiny_llama_dir, **LAYOUTS[layout])
        cycle = [eng.tokenizer.convert_tokens_to_ids(c) for c in "xyz"]

        def execute(out, cycle=cycle):
            rows = {c.request: len(c.draft) + 1 for c in out.chunks if c.samples}
            return {r.request_id: [cycle[(r.num_tokens + i) % 3] for i in range(n)] for r, n in rows.items()}

        monkeypatch.setattr(eng.runner, "execute", execute)
        req = eng.add_request(
            [cycle[i % 3] for i in range(7)], SamplingParams(max_tokens=20, temperature=0.0, stop=("zx",))
        )
        steps, text = [], ""
        while eng.has_unfinished():
            for o in eng.step():
                steps.append(o.token_ids)
                text += o.text
        outputs[layout] = (req.output_token_ids, text, req.finish_reason, steps)
    plain, spec = outputs["roomy"], outputs["speculative"]
    assert plain[:3] == spec[:3] == (cycle[1:] + cycle[:1], "y", FinishReason.STOP)
    assert plain[3] == [[c] for c in cycle[1:] + cycle[:1]]  # y, z, x: one token per step
    assert spec[3] == [cycle[1:2], cycle[2:] + cycle[:1]]  # y, then z x of the guesses z x y + z


def test_sampled_requests_verify_drafts_and_finish_cleanly(tiny_llama_dir):
    eng = engine_for(tiny_llama_dir, **LAYOUTS["speculative"])
    prompts = [eng.tokenizer.encode(t) for t in TEXTS]
    outs = eng.generate(prompts, SamplingParams(max_tokens=24, temperature=0.3, ignore_eos=True))
    assert all(len(o.token_ids) == 24 and o.finish_reason is FinishReason.LENGTH for o in outs)
    assert 0 < eng.scheduler.num_accepted_tokens < eng.scheduler.num_draft_tokens
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_llama_dir):
    eng = engine_for(tiny_llama_dir)
    prompts = [eng.tokenizer.encode(t) for t in TEXTS]
    greedy = [o.token_ids for o in eng.generate(prompts, GREEDY)]
    k1 = eng.generate(prompts, SamplingParams(max_tokens=24, temperature=5.0, top_k=1, seed=1))
    p0 = eng.generate(prompts, SamplingParams(max_tokens=24, temperature=5.0, top_p=1e-6, seed=2))
    # A temperature so small that dividing by it overflows float32 is greedy, not token 0.
    cold = eng.generate(prompts, SamplingParams(max_tokens=24, temperature=1e-40, seed=3))
    assert [o.token_ids for o in k1] == greedy
    assert [o.token_ids for o in p0] == greedy
    assert [o.token_ids for o in cold] == greedy


def test_temperature_sampling_follows_the_distribution(tiny_llama_dir):
    eng = engine_for(tiny_llama_dir)
    prompt = eng.tokenizer.encode("a")
    with torch.inference_mode():
        (logits,) = hf_logits(tiny_llama_dir, prompt)
    probs = torch.softmax(logits / 2.0, -1)
    outs = eng.generate([prompt] * 400, SamplingParams(max_tokens=1, temperature=2.0))
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in outs]), minlength=probs.numel()).float()
    top = probs.argmax()
    # The most likely token's frequency is within 5 standard deviations of its probability.
    p = probs[top].item()
    assert abs(counts[top].item() / 400 - p) < 5 * (p * (1 - p) / 400) ** 0.5 + 1e-3


def hf_logits(model_dir, prompt):
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return hf(torch.tensor([prompt])).logits[:, -1]


def test_stop_strings_and_stop_token_ids(tiny_llama_dir):
    eng = engine_for(tiny_llama_dir)
    prompt = eng.tokenizer.encode("Continuous batching")
    free = eng.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    stop = free.text[5:8]
    assert stop, "the reference output is too short to pick a stop string from"
    out = eng.generate(
        [prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=(stop,))
    )[0]
    assert out.finish_reason is FinishReason.STOP
    assert out.text == free.text[: free.text.find(stop)]
    # The stop string arriving with the last token max_tokens allows is still a stop, as in vLLM.
    last = SamplingParams(max_tokens=len(out.token_ids), temperature=0.0, ignore_eos=True, stop=(stop,))
    assert eng.generate([prompt], last)[0].finish_reason is FinishReason.STOP
    tok = free.token_ids[3]
    out = eng.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=(tok,)))[0]
    assert (
        out.finish_reason is FinishReason.STOP
        and out.token_ids == free.token_ids[: free.token_ids.index(tok) + 1]
    )


def test_context_length_ends_generation(tiny_llama_dir):
    eng = engine_for(tiny_llama_dir, max_model_len=20)
    out = eng.generate(
        [list(range(5, 15))], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    )[0]
    assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 10


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda e: e.add_request([], GREEDY), "empty"),
        (lambda e: e.add_request(list(range(1, 200)), GREEDY), "context length is 160"),
        (lambda e: e.add_request([10**9], GREEDY), "token ids must be in"),
        (lambda e: SamplingParams(max_tokens=0), "max_tokens"),
        (lambda e: SamplingParams(max_tokens=-5), "max_tokens"),
        (lambda e: SamplingParams(temperature=-1), "temperature"),
        (lambda e: SamplingParams(top_p=0), "top_p"),
        (lambda e: SamplingParams(top_k=-1), "top_k"),
        (lambda e: SamplingParams(seed=-1), "seed"),
        (lambda e: SamplingParams(stop=("",)), "stop"),
    ],
)
def test_bad_input_is_refused_and_the_engine_keeps_serving(tiny_llama_dir, make, message):
    eng = engine_for(tiny_llama_dir)
    with pytest.raises(InvalidRequest, match=message):
        make(eng)
    assert not eng.has_unfinished() and eng.kv.num_free_blocks == eng.kv.num_blocks
    (out,) = eng.generate([eng.tokenizer.encode("The quick")], GREEDY)
    assert out.token_ids


def test_a_failing_step_ends_its_requests_and_frees_their_blocks(tiny_llama_dir, monkeypatch):
    eng = engine_for(tiny_llama_dir, cache=CacheConfig(block_size=4, kv_cache_bytes=4 << 20))
    real = eng.runner.execute

    def boom(out):
        monkeypatch.setattr(eng.runner, "execute", real)
        raise RuntimeError("injected fault")

    monkeypatch.setattr(eng.runner, "execute", boom)
    prompts = [eng.tokenizer.encode(t) for t in TEXTS]
    failed = eng.generate(prompts, GREEDY)
    assert all(o.finish_reason is FinishReason.ERROR and "injected" in (o.error or "") for o in failed)
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    # The failed step never wrote the blocks it had named for the prefix cache: none is reused.
    ok = eng.generate(prompts, GREEDY)
    assert [o.token_ids for o in ok] == hf_greedy(tiny_llama_dir, prompts, GREEDY.max_tokens)


def test_engine_config_is_validated():
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="float8")
    with pytest.raises(ValueError, match="power of two"):
        CacheConfig(block_size=12)
    with pytest.raises(ValueError, match="mode"):
        SchedulerConfig(mode="eager")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SchedulerConfig(num_speculative_tokens=-1)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SchedulerConfig(num_speculative_tokens=17)
    with pytest.raises(ValueError, match="prompt_lookup"):
        SchedulerConfig(prompt_lookup_min=3, prompt_lookup_max=2)
    with pytest.raises(ValueError, match="speculative_max_seqs"):
        SchedulerConfig(speculative_max_seqs=0)


def test_kv_budget_too_small_for_one_sequence_is_a_clear_error(tiny_llama_dir):
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        engine_for(tiny_llama_dir, cache=CacheConfig(kv_cache_bytes=4096))


async def test_async_streams_and_random_cancels_free_every_block(tiny_llama_dir):
    eng = engine_for(tiny_llama_dir, cache=CacheConfig(block_size=4, kv_cache_bytes=1 << 20))
    prompts = [eng.tokenizer.encode(t) for t in TEXTS]
    expected = {i: o.token_ids for i, o in enumerate(eng.generate(prompts, GREEDY))}
    aeng = AsyncEngine(eng)
    await aeng.start()
    rng = random.Random(0)

    async def consume(i: int, cancel_after: int | None) -> list[int]:
        got: list[int] = []
        stream = aeng.generate(prompts[i % len(prompts)], GREEDY)
        async for out in stream:
            got += out.token_ids
            if cancel_after is not None and len(got) >= cancel_after:
                await stream.aclose()
                break
        return got

    plan = [(i, rng.choice([None, None, 0, 1, 5])) for i in range(300)]
    results = await asyncio.gather(*(consume(i, c) for i, c in plan))
    for (i, cancel), got in zip(plan, results):
        want = expected[i % len(prompts)]
        assert got == (want if cancel is None else want[: len(got)])
    with pytest.raises(InvalidRequest, match="empty"):
        async for _ in aeng.generate([], GREEDY):
            pass
    await aeng.stop()
    assert eng.kv.num_free_blocks == eng.kv.num_blocks
    assert not eng.requests and not eng.has_unfinished()


def test_output_ending_inside_a_multibyte_character_keeps_its_text(tiny_llama_dir):
    """A token can end in the first bytes of a character: its text waits for the next token. If
    the output ends there, the text decoded so far (complete characters included) is not lost."""
    from lorafleet.engine.detokenizer import Detokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    partial = next(
        i for i in range(tok.vocab_size)
        if tok.decode([i]).endswith("\ufffd") and tok.decode([i]).rstrip("\ufffd").strip()
    )  # fmt: skip
    prompt = tok.encode("a")
    detok = Detokenizer(tok, prompt)
    first = tok.encode(" b")[-1]
    text = detok.add(first)[0] + detok.add(partial)[0] + detok.flush()
    assert text == tok.decode([*prompt[-4:], first, partial])[len(tok.decode(prompt[-4:])) :]
    assert text.rstrip("\ufffd").endswith(tok.decode([partial]).rstrip("\ufffd"))
