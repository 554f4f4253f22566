"""Standard scaled dot-product attention: ``softmax(q kᵀ / sqrt(D)) v``."""

from lm.model.attention.base import Attention, register


@register("softmax")
class SoftmaxAttention(Attention):
    """The base class already is standard attention; registered under its own name."""
