"""The Elliptical paper's Table 1 baselines as attention variants (registry names in brackets).

- Performer / FAVOR+ [performer]: positive orthogonal random features, linear-time causal prefix sums.
- Transformer-MGK [mgk]: each key a mixture of Gaussians (2 components), softmax over components.
- FourierFormer [fourier]: generalized Fourier integral kernel Π_d sinc(R_d (q_d − k_d))^4.
- Transformer-RKDE [rkde]: Huber-robust KDE weights (kernelised IRLS), Gaussian kernel; joint (key,
  value) weights in the numerator, key weights in the denominator, as the reference code.
- Transformer-SPKDE [spkde]: scaled-and-projected KDE weights (simplex QP, projected gradient), same
  joint/marginal weighting, β = 1/(1 − 0.05).
- Transformer-MoM [mom]: median-of-means -- K random key blocks, attend only the median block by the
  keys' kernel log-likelihood (the reference code, made causal); contiguous blocks as an option.

docs/baselines.md sets each default beside the reference code and lists every remaining departure.

All are strictly causal and run over [memory; segment] keys under the decoder's causal mask; none
implements Transformer-XL relative positions (``supports_relative = False``), the paper's Table 1
setting being absolute positions. Each file's docstring states the exact formula implemented.
"""

from lm.model.attention.baselines import fourier, mgk, mom, performer, rkde, spkde  # noqa: F401  (registration)
