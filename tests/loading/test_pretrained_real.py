"""Real checkpoints through `load_pretrained` match transformers (PyTorch) on the same files."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from parity import assert_close

pytestmark = pytest.mark.real_weights

PROMPT_32 = ("The history of the Roman Empire spans many centuries, from the founding of the city to the fall "
             "of Constantinople, and its legacy shaped law, language, architecture and the way that")


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from jaxpeft import load_pretrained

    return load_pretrained(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    p = Path(smollm2_gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name)
    return model.eval()


def test_smollm2_logits_match_transformers_gguf_on_32_token_prompt(smollm2, smollm2_hf):
    import jax
    import torch

    ids = smollm2.tokenizer.encode(PROMPT_32)[:32]
    assert len(ids) == 32
    with torch.no_grad():
        ref = smollm2_hf(torch.tensor([ids])).logits.numpy()
    out = jax.jit(lambda p, x: smollm2.module.apply({"params": p}, x))(smollm2.params, np.array([ids]))
    assert_close(out.logits, ref, max_abs=1e-3, what="SmolLM2 logits vs transformers")


def test_smollm2_greedy_20_tokens_identical_to_transformers(smollm2, smollm2_hf):
    import torch

    from jaxpeft.generation import generate

    ids = smollm2.tokenizer.encode("The capital of France is")
    ours = generate(smollm2.module, smollm2.params, [ids], max_new_tokens=20, eos_token_ids=())[0]
    with torch.no_grad():
        ref = smollm2_hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                                  pad_token_id=2)[0, len(ids):].tolist()
    assert ours == ref
    assert smollm2.tokenizer.decode(ours).lstrip().startswith("Paris")


def test_smollm2_batched_left_padded_generation_equals_single_prompts(smollm2):
    from jaxpeft.generation import generate

    prompts = [smollm2.tokenizer.encode(t) for t in ("The capital of France is", "1, 2, 3, 4,")]
    kw = dict(max_new_tokens=8, eos_token_ids=(), pad_token_id=2)
    batched = generate(smollm2.module, smollm2.params, prompts, **kw)
    singles = [generate(smollm2.module, smollm2.params, [p], **kw)[0] for p in prompts]
    assert batched == singles


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    from jaxpeft import load_pretrained

    return load_pretrained(minilm_dir, task="base")


def test_minilm_hidden_states_and_mean_pooled_embeddings_match_transformers(minilm, minilm_dir):
    transformers = pytest.importorskip("transformers")
    import torch

    texts = ["A man is eating food.", "A man is eating a piece of bread.", "Short."]
    tok = minilm.tokenizer.tokenizer
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    tok.no_padding()
    ids = np.array([e.ids for e in enc])
    mask = np.array([e.attention_mask for e in enc])
    ref_model = transformers.AutoModel.from_pretrained(str(minilm_dir)).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    out = minilm.module.apply({"params": minilm.params}, ids, mask)
    assert_close(out.hidden, ref, mask, max_abs=1e-4, what="MiniLM last hidden state")

    def embed(h):
        h = np.asarray(h, np.float64)
        e = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return e / np.linalg.norm(e, axis=-1, keepdims=True)

    cos = (embed(out.hidden) * embed(ref)).sum(-1)
    assert np.all(cos >= 1 - 1e-6), cos
    sim = float(embed(out.hidden)[0] @ embed(out.hidden)[1])
    assert abs(sim - 0.755) < 0.01  # MODELS.md sanity value


@pytest.mark.slow
def test_gemma3_270m_logits_match_transformers_gguf_short_and_past_the_sliding_window(gemma3_gguf,
                                                                                      gemma3_transformers):
    """A short prompt, and 540 tokens: past the 512-token window, so the sliding layers' mask decides the last 28
    positions (measured max-abs 1.6e-4 with the right window; a window off by one either way or no window at all
    gives 0.24-3.0, far above the 2e-3 tolerance)."""
    import torch

    from jaxpeft import load_pretrained

    pre = load_pretrained(gemma3_gguf)
    ref_model = gemma3_transformers
    window = pre.config.sliding_window
    assert window == 512 and "sliding_attention" in pre.config.layer_types
    long_ids = pre.tokenizer.encode(" ".join([PROMPT_32] * 20))[:540]
    assert len(long_ids) == 540 > window
    for what, ids in (("short", pre.tokenizer.encode("The capital of France is")), ("540 tokens", long_ids)):
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids])).logits.numpy()
        out = pre.module.apply({"params": pre.params}, np.array([ids]))
        assert_close(out.logits, ref, max_abs=2e-3, rel=1e-5, what=f"Gemma-3-270m logits, {what}")


def test_cli_generate_runs_with_torch_unimportable(smollm2_gguf, tmp_path):
    """The library never needs torch: a meta-path blocker makes `import torch` fail in the subprocess."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(textwrap.dedent("""
        import sys
        class _NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None
        sys.meta_path.insert(0, _NoTorch())
    """))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               JAXPEFT_COMPILATION_CACHE=str(Path(os.environ.get("JAXPEFT_CACHE", Path.home() / ".cache/jaxpeft"))
                                             / "xla-cache"))
    code = "import torch"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode != 0
    res = subprocess.run([sys.executable, "-m", "jaxpeft", "generate", str(smollm2_gguf), "--prompt",
                          "The capital of France is", "--max-new-tokens", "5"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().startswith("Paris"), res.stdout


def test_cli_download_prints_the_cached_checkpoint_path(smollm2_gguf):
    res = subprocess.run([sys.executable, "-m", "jaxpeft", "download", "smollm2-135m-instruct"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()) == Path(smollm2_gguf)
