import pytest
import torch


@pytest.fixture(autouse=True)
def _float64_default(request):
    """Limits are compared in float64; the μP tests train float32 models as users do."""
    path = str(request.node.path)
    if "/mup/" in path or "/parametrization/" in path:
        yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def inputs():
    """Six inputs of different norms, one pair exactly anti-parallel (ρ = -1 edge case)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=gen) * torch.tensor([0.3, 0.7, 1.0, 1.5, 2.0, 1.2])[:, None]
    x[5] = -0.6 * x[2]
    return x
