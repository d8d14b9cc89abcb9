"""The decoder's linear layers for the fast CPU decode path: packed (oneDNN), bf16 blocked or int8, with q/k/v and
gate/up stacked.

`F.linear` on bf16 weights runs a matrix-vector product at about 60 % of the bandwidth oneDNN reaches with the same
weights reordered once into its blocked layout ("prepacked"); the result is the same to the bit. `PackedLinear`
holds only that packed weight. oneDNN packs bf16 only on CPUs with AVX-512 or AVX-NE-CONVERT; elsewhere `Bf16Linear`
holds the bf16 weight in our kernels' blocked layout (`cpu_kernels`). `Int8Linear` holds int8 weights with one float
scale per output channel, multiplied by our blocked kernel or torch's weight-only int8 kernel. Linear layers that
always read the same input (an attention block's q, k, v; an MLP's gate and up) become one stacked matrix, so one
call reads them all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import cpu_kernels


class PackedLinear(nn.Module):
    """A linear layer whose weight is held only in oneDNN's packed layout (float32 or bfloat16)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = linear.bias
        self.weight_bytes = linear.weight.numel() * linear.weight.element_size()  # opaque tensors have no size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W.T + b`, as `nn.Linear`."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed (oneDNN)"


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and one scale per output channel; activations stay in their dtype.

    With `kernel` (and a shape it takes), the weight is stored in that kernel's blocked layout and multiplied by it;
    otherwise it stays row-major for torch's weight-only int8 kernel. The int8 values are the same either way; the
    kernel keeps the scales in float32, torch's kernel in the activations' dtype."""

    def __init__(self, linear: nn.Linear, kernel: cpu_kernels.Kernels | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        scale = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
        quantized = torch.round(weight.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.kernel = kernel if kernel is not None and kernel.fits(*quantized.shape) else None
        if self.kernel is not None:
            self.register_buffer("weight_int8", self.kernel.block(quantized))
            self.register_buffer("scale", scale)  # float32: the kernel scales its float32 sums
        else:
            self.register_buffer("weight_int8", quantized)
            self.register_buffer("scale", scale.to(weight.dtype))  # torch's kernel wants the activations' dtype
        self.bias = linear.bias
        self.weight_bytes = quantized.numel() + self.scale.numel() * self.scale.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ (q * scale).T + b`."""
        flat = x.reshape(-1, x.shape[-1])
        if self.kernel is not None:
            out = self.kernel.int8_matmul(flat.contiguous(), self.weight_int8, self.scale)
        else:
            if flat.dtype != self.scale.dtype:
                flat = flat.to(self.scale.dtype)
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        how = f"blocked, {self.kernel.vector_bits}-bit kernel" if self.kernel is not None else "torch's kernel"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel ({how})"


class Bf16Linear(nn.Module):
    """A linear layer whose weight is stored in bf16 in our kernels' blocked layout and multiplied by them: bf16
    widened to float32 in registers, float32 products and sums, on any CPU with AVX2 and FMA (where oneDNN packs
    no bf16). Activations stay in their dtype, bf16 or float32. A shape the layout does not take keeps a row-major
    bf16 weight for `F.linear` in the activations' dtype.

    The blocked weight is a plain attribute, not a buffer, so converting the model's dtype (`.float()`) leaves it
    in bf16; `weight_bytes` carries its size for `Status`."""

    def __init__(self, linear: nn.Linear, kernel: cpu_kernels.Kernels) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().to(torch.bfloat16)
        self.kernel = kernel if kernel.fits(*weight.shape) else None
        # A copy either way: the original's mapped checkpoint pages are handed back once it is replaced.
        self.weight_bf16 = kernel.block(weight) if self.kernel is not None else weight.clone()
        self.bias = linear.bias
        self.weight_bytes = weight.numel() * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W.T + b`, as `nn.Linear`, in x's dtype."""
        if self.kernel is None:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return nn.functional.linear(x, self.weight_bf16.to(x.dtype), bias)
        flat = x.reshape(-1, x.shape[-1])
        out = self.kernel.bf16_matmul(flat.contiguous(), self.weight_bf16)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        how = f"blocked, {self.kernel.vector_bits}-bit kernel" if self.kernel is not None else "row-major"
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 ({how})"


_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # linears that always read the same input


class LinearGroup:
    """Linear layers that are always called in a row on the same input (an attention block's q, k, v; an MLP's
    gate and up): their weights are stacked into one packed matrix, so one call reads them all. Each member's call
    returns its slice of that one product, computed when the first member sees a new input."""

    def __init__(self, linears: list[nn.Linear], factory: Callable[[nn.Linear], nn.Module]) -> None:
        self.sizes = [linear.out_features for linear in linears]
        self.linear = factory(linear_from(torch.cat([linear.weight.detach() for linear in linears])))
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._input is not x:
            self._outputs = self.linear(x).split(self.sizes, dim=-1)
            self._input = x
        out = self._outputs[index]
        if index == len(self.sizes) - 1:
            self._input, self._outputs = None, ()
        return out


class _Member(nn.Module):
    """One linear layer of a `LinearGroup`, standing where the original was."""

    def __init__(self, group: LinearGroup, index: int) -> None:
        super().__init__()
        self.group, self.index = group, index
        self.fused = group.linear  # registered, so the packed weight shows in the module tree
        self.out_features = group.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This member's slice of the group's product."""
        return self.group.output(x, self.index)


def linear_from(weight: torch.Tensor) -> nn.Linear:
    """An `nn.Linear` (no bias) holding `weight`."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def stacked(*members: nn.Module) -> LinearGroup | None:
    """The `LinearGroup` these modules are, in this order, or None."""
    if not all(isinstance(m, _Member) for m in members):
        return None
    group = members[0].group  # type: ignore[union-attr]
    if len(group.sizes) != len(members):
        return None
    if any(m.group is not group or m.index != i for i, m in enumerate(members)):  # type: ignore[union-attr]
        return None
    return group


def replace_linears(model: nn.Module, factory: Callable[[nn.Linear], nn.Module]) -> list[nn.Linear]:
    """Replace every linear layer under `model` by `factory(layer)`, q/k/v and gate/up stacked first; returns the
    replaced layers (their weights are the caller's to release)."""
    replaced: list[nn.Linear] = []
    for owner in list(model.modules()):
        for names in _FUSED:
            members = [getattr(owner, name, None) for name in names]
            if all(isinstance(m, nn.Linear) and m.bias is None for m in members):
                group = LinearGroup(members, factory)  # type: ignore[arg-type]
                for index, name in enumerate(names):
                    setattr(owner, name, _Member(group, index))
                replaced += members  # type: ignore[arg-type]
        for name, child in list(owner.named_children()):
            if isinstance(child, nn.Linear):
                setattr(owner, name, factory(child))
                replaced.append(child)
    return replaced
