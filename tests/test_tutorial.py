"""The tutorial's grader, microllama.golden.tutorial: a learner's tensor against Meta's recording at a capture point."""

import pytest
import torch

from microllama.golden.tutorial import PROMPT_IDS, CheckFailed, check, golden_set, prompt_ids, recorded
from microllama.golden.verify import comparison_mode


def test_check_passes_meta_recorded_activation(capsys):
    assert check("layers.0.attention_norm", recorded("layers.0.attention_norm", 3), 3) is True
    assert check(PROMPT_IDS, prompt_ids(2), 2) is True
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("layers.0.attention_norm, prompt 3 (40 positions): ok, max abs err 0; check: ")
    assert out[1] == "prompt ids (tokenizer), prompt 2: identical (9 ids)"


def test_check_names_the_capture_point_and_where_a_value_differs():
    x = recorded("layers.0.feed_forward", 1).clone()
    x[4, 7] += 1e-3  # above LOGITS_ATOL (3.05e-5): fails bit-exact or within tolerance
    with pytest.raises(CheckFailed, match=r"^layers\.0\.feed_forward, prompt 1 \(11 positions\): DIVERGES from Meta's "
                       r"recording: max abs err 0\.001 .*worst at prompt 1 pos 4; check: "):  # fmt: skip
        check("layers.0.feed_forward", x, 1)
    with pytest.raises(CheckFailed, match=r"^prompt ids \(tokenizer\), prompt 0: DIFFER from Meta's at token 2"):
        check(PROMPT_IDS, [128000, 75471, 12], 0)


def test_check_applies_the_sets_rule_bit_exact_here_only_on_the_recordings_platform():
    x = recorded("norm", "long-range")
    nudged = x + 2**-20  # one unit in the last place at 0.5 to 1, far within LOGITS_ATOL
    if comparison_mode(golden_set(), "cpu").exact:
        hint = r"within atol 3\.05e-05: Meta's arithmetic in another order\?\)$"
        with pytest.raises(
            CheckFailed, match=r"^norm, long-range \(1 position\): DIVERGES .*check: bit-exact.*" + hint
        ):
            check("norm", nudged, "long-range")
    else:
        assert check("norm", nudged, "long-range")


@pytest.mark.parametrize(
    ("point", "actual", "case", "error", "message"),
    [
        ("layers.0.attention", torch.zeros(8, 32), 0, ValueError,
         r"^layers\.0\.attention: expected shape \(8, 64\) \(prompt 0's 8 positions x dim 64\), or \(1, 8, 64\), "
         r"got \(8, 32\)$"),
        ("layers.0.attention", torch.zeros(2, 8, 64), 0, ValueError, r"got \(2, 8, 64\)$"),
        ("layers.0.attn", torch.zeros(8, 64), 0, ValueError,
         r"^'layers\.0\.attn' is not a capture point of tiny-fp32-cpu-ws1: expected one of prompt ids, tok_embeddings"),
        ("norm", torch.zeros(8, 64), 6, ValueError, r"^case 6: expected a prompt number 0 to 5 or 'long-range'$"),
        ("norm", [[0.0] * 64] * 8, 0, TypeError, r"^norm: expected a torch\.Tensor, got list$"),
    ],
)  # fmt: skip
def test_check_refuses_bad_input_in_one_line(point, actual, case, error, message):
    with pytest.raises(error, match=message) as e:
        check(point, actual, case)
    assert "\n" not in str(e.value)
