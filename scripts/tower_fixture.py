"""What the tower fixture scripts record (make_openclip_fixture.py, make_torchvision_resnet_fixture.py).

`record` randomises a tower's BatchNorm affine parameters and running statistics (so that they
matter), draws a random input, and returns the arrays the tests compare against: the state_dict,
the input, the feature map in eval mode and after one train-mode forward, and the running
statistics after that forward.
"""

import numpy as np
import torch


def record(net, features, input_shape, key_prefix: str = '') -> dict[str, np.ndarray]:
  """net: the torch tower; features(net, x) -> its feature map; keys get `key_prefix`."""
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  x = torch.randn(*input_shape)
  state = {f'state/{key_prefix}{k}': v.numpy().copy() for k, v in net.state_dict().items()}
  net.eval()
  with torch.no_grad():
    eval_out = features(net, x)
    net.train()
    train_out = features(net, x)
  bn_after = {f'bn_after/{key_prefix}{k}': v.numpy().copy()
              for k, v in net.state_dict().items() if 'running' in k}
  return {**state, **bn_after, 'input': x.numpy(), 'eval_features': eval_out.numpy(),
          'train_features': train_out.numpy()}
