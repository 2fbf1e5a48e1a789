"""Pretraining data: images in, two augmented views per image out (SPEC §1.1, §1.7).

``data.pipeline`` picks one of two ways to make the views; :mod:`.feed` runs the one chosen.

- :mod:`.folder`: the images of an ImageFolder-style directory, unreadable ones counted by
  path; :class:`~.folder.TwoViewDataset`, the PIL path's dataset.
- :mod:`.samples`: the file list as two numpy buffers (paths, labels), so that DataLoader
  workers share it instead of copying it page by page.
- :mod:`.loader`: the resumable order of an epoch (sampler, DataLoader, steps per epoch).
- :mod:`.views`: the PIL path's views, torchvision transforms on one image at a time
  (:class:`~.views.PilTwoViews`), and the evaluation transform.
- :mod:`.decode`: encoded bytes to uint8 tensors (nvjpeg on a GPU, torchvision or PIL else).
- :mod:`.resident`: a small dataset decoded once and held on the device.
- :mod:`.tensor_params`: the batched path's draws, every view's parameters from the
  images' sizes and the samples' seeds, as torchvision draws them;
- :mod:`.tensor_ops`: its pixel operations, which apply those parameters to a batch;
- :mod:`.tensor_views`: both together (:class:`~.tensor_views.TwoViewAugment`);
- :mod:`.tensor_pipeline`: the batched path from files or a resident copy to a
  :class:`~.tensor_pipeline.ViewBatch`.
- :mod:`.feed`: the batches of one training process, whichever path makes them.

Every path draws a sample's views from (seed, epoch, dataset index) alone.
"""
