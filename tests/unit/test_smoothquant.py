"""SmoothQuant (tunelab.smoothquant): the same function, with activation outliers moved into
the weights."""
import torch

from tunelab import smoothquant


def test_smoothing_keeps_the_function_and_flattens_outlier_channels():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    x = torch.randn(64, 16)
    x[:, 3] *= 80.0  # one outlier channel, as in transformer hidden states
    with torch.no_grad():
        before = model(x)
        first_input = x.abs().amax(0)
    maxima = smoothquant.input_maxima(model, [{"input": x}], skip=["2"])
    assert set(maxima) == {"0"} and torch.equal(maxima["0"], first_input)
    assert smoothquant.smooth(model, maxima) == 1
    assert isinstance(model[0], smoothquant.SmoothedLinear) and isinstance(model[2],
                                                                           torch.nn.Linear)
    with torch.no_grad():
        after = model(x)
        seen = (x * model[0].inv_scale).abs().amax(0)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    # the largest channel over the median: what one int8 scale per matrix must cover
    ratio = lambda v: (v.max() / v.median()).item()  # noqa: E731
    assert ratio(seen) < ratio(first_input) / 4


def test_calibration_skips_named_modules_and_their_children():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4),
                                torch.nn.Sequential(torch.nn.Linear(4, 4)))
    maxima = smoothquant.input_maxima(model, [{"input": torch.ones(2, 4)}], skip=["1"])
    assert set(maxima) == {"0"}
