"""lpq.train.domains.window_nll: the per-window NLL every perplexity of lpq train and lpq ptq is made of."""
import torch
import torch.nn.functional as F

from lpq.models.tiny import build_tiny
from lpq.train.domains import window_nll


def test_window_nll_is_the_summed_next_token_loss_of_each_window():
    model = build_tiny("tiny-llama").model.float()
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    want = [float(F.cross_entropy(logits[i, :-1], ids[i, 1:], reduction="sum")) for i in range(3)]
    for batch_size in (1, 2, 3):
        got = window_nll(model, ids, batch_size)
        assert len(got) == 3
        assert all(abs(g - w) <= 1e-5 * abs(w) for g, w in zip(got, want)), (got, want)
