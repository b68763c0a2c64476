"""jaxpeft.generation: greedy equals step-by-step argmax, sampling options behave, stop tokens end rows,
adapters work through model_fn and agree with merged weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_tiny
from jaxpeft.adapters import AdaptedModel, LoraConfig
from jaxpeft.adapters.merge import merge
from jaxpeft.generation import SamplingConfig, choose_tokens, generate
from jaxpeft.models import build_model


@pytest.fixture(scope="module")
def tiny():
    t = hf_tiny.load("llama", "causal_lm")
    return build_model(t.cfg, "causal_lm"), t.params, t.cfg


def _greedy_reference(module, params, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = module.apply({"params": params}, np.array([ids])).logits
        ids.append(int(np.argmax(logits[0, -1])))
    return ids[len(prompt):]


def test_greedy_generation_equals_full_forward_argmax_per_step(tiny):
    module, params, _ = tiny
    prompt = [5, 9, 3, 17, 4]
    assert generate(module, params, [prompt], max_new_tokens=6, bucket=8)[0] == _greedy_reference(
        module, params, prompt, 6)


def test_left_padded_batch_gives_each_row_its_single_prompt_result(tiny):
    module, params, _ = tiny
    prompts = [[5, 9, 3], [7, 1, 2, 8, 11, 6, 4]]
    batched = generate(module, params, prompts, max_new_tokens=5, bucket=8)
    assert batched == [generate(module, params, [p], max_new_tokens=5, bucket=8)[0] for p in prompts]


def test_stop_token_ends_a_row_and_is_included(tiny):
    module, params, _ = tiny
    prompt = [5, 9, 3, 17, 4]
    ref = _greedy_reference(module, params, prompt, 6)
    stop = ref[2]
    out = generate(module, params, [prompt], max_new_tokens=6, eos_token_ids=(stop,), bucket=8)[0]
    assert out == ref[: ref.index(stop) + 1]


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny):
    module, params, _ = tiny
    prompt = [5, 9, 3, 17, 4]
    hot = SamplingConfig(temperature=1.5)
    a = generate(module, params, [prompt], max_new_tokens=8, sampling=hot, seed=1, bucket=8)
    b = generate(module, params, [prompt], max_new_tokens=8, sampling=hot, seed=1, bucket=8)
    c = generate(module, params, [prompt], max_new_tokens=8, sampling=hot, seed=2, bucket=8)
    assert a == b and a != c
    k1 = generate(module, params, [prompt], max_new_tokens=6, sampling=SamplingConfig(1.0, top_k=1), bucket=8)
    assert k1[0] == _greedy_reference(module, params, prompt, 6)


def test_top_p_keeps_only_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(choose_tokens(logits, jax.random.key(s), SamplingConfig(1.0, top_p=0.7))[0]) for s in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are cut
    draws = {int(choose_tokens(logits, jax.random.key(s), SamplingConfig(1.0, top_k=3))[0]) for s in range(300)}
    assert draws == {0, 1, 2}


def test_bad_sampling_options_raise():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)


def test_generation_through_an_adapter_equals_generation_with_merged_weights(tiny):
    module, params, _ = tiny
    model = AdaptedModel.wrap(module).add("a", LoraConfig(r=4, lora_alpha=32, init_lora_weights=False))
    state = model.init(jax.random.key(3), params)
    merged, _ = merge(model, params, state, "a")
    prompt = [5, 9, 3, 17, 4]

    def model_fn(p, ids, mask, cache):
        return model.apply(p[0], p[1], ids, mask, cache=cache)

    adapted = generate(module, (params, state), [prompt], max_new_tokens=6, bucket=8, model_fn=model_fn,
                       cache_key=(model, "a"))
    assert adapted == generate(module, merged, [prompt], max_new_tokens=6, bucket=8)
    assert adapted != generate(module, params, [prompt], max_new_tokens=6, bucket=8)
