"""fused_bptt: fused tanh/relu RNN ops for truncated backpropagation through time.

FusedRNN            drop-in for torch.nn.RNN
swap_rnn            replace every nn.RNN inside a model with a FusedRNN (same weights)
rnn_tanh, rnn_relu  one layer over a whole chunk: (x, h0, W_ih, W_hh, b_ih, b_hh) -> (y, h_n)
available_backends  the backends that work here, in preference order
reference           the pure-PyTorch oracle
tbptt               stateful (TBPTT(k1, k2)) and stateless chunk drivers
train               RNNWithHead and train_tbptt, the per-chunk training loop
checkpoint          checkpointed_bptt: exact full-sequence BPTT in O(sqrt(T)) memory
"""

from . import reference
from .checkpoint import checkpointed_bptt
from .function import available_backends, rnn_relu, rnn_tanh
from .module import FusedRNN, swap_rnn
from .tbptt import *  # noqa: F401,F403
from .tbptt import __all__ as _tbptt_all
from .train import *  # noqa: F401,F403
from .train import __all__ as _train_all

__all__ = [
    "FusedRNN",
    "swap_rnn",
    "rnn_tanh",
    "rnn_relu",
    "available_backends",
    "reference",
    "checkpointed_bptt",
    *_tbptt_all,
    *_train_all,
]
__version__ = "0.1.0"
