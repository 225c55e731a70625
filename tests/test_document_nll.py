"""The document-NLL control (data/document_nll.py, tools/document_nll_data.py): preprocessed as
`pair` data and trained with loss.name=sft, its loss is the document tokens' mean NLL (plus the one
end-of-turn token), measured with transformers in float64 on the embedded SmolLM2."""
import json

import numpy as np
import pytest
import torch

from fixtures import ROOT, run_tool
from megatron_longpo.generation.gazetteer import gazetteer


@pytest.mark.slow
def test_docnll_loss_is_the_document_mean_nll(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    from megatron_longpo.checks import numerics as N

    _, doc = gazetteer(0, 0, 120)
    pairs = tmp_path / "pairs.jsonl"
    turn = {"short_context": doc[:200], "instruction": "Q?", "chosen": "yes it is", "rejected": "no it is not"}
    rows = [{"long_context": doc, "turns": [turn]}, {"long_context": doc, "turns": [turn]}]  # one document twice
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "docnll.jsonl"
    run_tool(ROOT / "tools/document_nll_data.py", pairs, "-o", out)
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(recs) == 1 and recs[0]["chosen"] == doc
    run_tool(ROOT / "tools/preprocess_pairs.py", "--input", out, "--kind", "pair", "--tokenizer", smollm2_dir,
             "--output", tmp_path / "docnll", "--workers", "1", "--no-progress", timeout=300)
    batch = N.dataset_batch(str(tmp_path / "docnll"), 0, "sft")
    seq = batch.roles["chosen"]
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    doc_ids = tok(doc, add_special_tokens=False)["input_ids"]
    scored = seq.tokens[seq.loss_mask].tolist()
    # the scored tokens: the document's own tokens, then the template's end of turn
    assert scored == doc_ids + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert len(doc_ids) > 150, len(doc_ids)
    model = N.hf_model(smollm2_dir, torch.float64).eval()
    with torch.no_grad():
        loss = float(N.hf_loss(model, batch))  # the SFT loss the trainer computes (tests/test_numerics.py)
        logits = model(torch.as_tensor(seq.tokens)[None]).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    pos = np.flatnonzero(seq.loss_mask)  # token t predicted from position t - 1
    nll = [-float(logp[t - 1, seq.tokens[t]]) for t in pos]
    doc_nll = float(np.mean(nll[:-1]))  # the document's tokens only
    assert loss == pytest.approx(np.mean(nll), rel=1e-12)
    assert loss == pytest.approx((len(doc_ids) * doc_nll + nll[-1]) / (len(doc_ids) + 1), rel=1e-12)
    # measured (2-core CPU dev machine): 196 document tokens, loss 3.9640 against the document's 3.9236;
    # the end-of-turn token's weight is 1 / (tokens + 1), 1e-4 on the run's ~10K-token documents
