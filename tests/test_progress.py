"""The compile status line (compiled_unet/progress.py): stages timed, C++ kernels counted, quiet off a terminal."""
import io

import pytest
import torch

from compiled_unet.progress import CompileProgress, count_cpp_kernels


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_quiet_when_not_a_terminal_or_asked(monkeypatch):
    plain = io.StringIO()
    progress = CompileProgress(stream=plain)
    with progress.stage("export"):
        pass
    progress.close()
    assert plain.getvalue() == "" and list(progress.stages) == ["export"]

    monkeypatch.setenv("COMPILED_UNET_PROGRESS", "0")
    terminal = FakeTerminal()
    progress = CompileProgress(stream=terminal)
    with progress.stage("export"):
        pass
    progress.close()
    assert terminal.getvalue() == ""


def test_stages_accumulate_in_order_and_summarise():
    progress = CompileProgress(enabled=False)
    for name in ("export", "passes", "export"):
        with progress.stage(name):
            pass
    assert list(progress.stages) == ["export", "passes"]
    assert progress.summary().startswith("export ") and ", passes " in progress.summary()


@pytest.mark.slow
def test_counts_the_cpp_kernels_inductor_compiles():
    def two_kernels(x, y):     # a pointwise chain and a matmul epilogue: Inductor emits C++ kernels for them
        return (x.sin() + y).relu() * 3, (x @ y).cos()

    graph = torch.fx.symbolic_trace(two_kernels)
    terminal = FakeTerminal()
    progress = CompileProgress(enabled=True, stream=terminal)
    with progress.stage("lowering"), count_cpp_kernels(progress):
        compiled = torch._inductor.compile(graph, [torch.randn(8, 8), torch.randn(8, 8)])
    progress.close()
    x, y = torch.randn(8, 8), torch.randn(8, 8)
    for got, want in zip(compiled(x, y), two_kernels(x, y)):
        torch.testing.assert_close(got, want)    # default fp32 tolerances: the counting wrapper changes nothing
    assert progress.kernels_total >= 1 and progress.kernels_done == progress.kernels_total
    shown = terminal.getvalue()
    assert f"C++ kernels {progress.kernels_total}/{progress.kernels_total}" in shown
    assert "compiled_unet lowering" in shown

    # The wrapper stays installed but counts only for a compile that asked, in its own thread.
    other = CompileProgress(enabled=False)
    torch._inductor.compile(torch.fx.symbolic_trace(lambda x: x.exp() - 1), [torch.randn(4)])
    assert other.kernels_total == 0
