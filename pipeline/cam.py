"""Class activation maps: Grad-CAM (paper Eq. 1-2) and SA-CAM (Eq. 3, = LayerCAM), click fusion (Eq. 4), and
the HDF5 CAM store. This module gathers the public names of the modules that implement them:

* :mod:`pipeline.cam_methods`: the CAM methods (pytorch-grad-cam style: one base class owns the hooks and the one
  batched forward/backward, for one layer or several at once; each method is a tiny subclass overriding one hook),
  :func:`make_cam`;
* :mod:`pipeline.cam_crops`: crop extraction on the classifier's crop geometry and the fusion of a click's crop
  maps into one image-sized map (:func:`paste_and_fuse`, :data:`FUSIONS`);
* :mod:`pipeline.cam_writer`: what to compute (:func:`click_entries`, :func:`image_entries`) and
  :func:`write_cam_store` (settings: :class:`CamStoreSettings`), resumable part by part, one shard of the global
  plan at a time;
* :mod:`pipeline.cam_store`: the store's layout, the plan and its shards (:func:`shard_parts`), the reader
  :class:`CamStore` (one layer of a store), :func:`merge_cam_stores`, and :class:`FusedMaps` (one map per click
  from several readers: layers and ensemble members).
"""
from __future__ import annotations

from .cam_crops import (FUSIONS, PASTE_MODES, MapGrid, extract_crops, fusion_weights, image_tensor, layer_grid,
                        paste_and_fuse, paste_maps, pixel_boxes)
from .cam_methods import (CAM_METHODS, ActivationsAndGradients, BaseCAM, ClassifierOutputTarget, GradCAM, LayerCAM,
                          SACAM, make_cam)
from .cam_store import INDEX_COLUMNS, STORE_FORMAT, CamStore, FusedMaps, merge_cam_stores, shard_parts
from .cam_writer import (CamEntry, CamStoreSettings, click_entries, image_entries, prefer_channels_last,
                         write_cam_store)

_paste = paste_maps  # (its former name here: bench/cam_throughput.py)

__all__ = ["FUSIONS", "PASTE_MODES", "MapGrid", "layer_grid", "extract_crops", "fusion_weights", "image_tensor", "paste_and_fuse", "paste_maps",
           "pixel_boxes", "CAM_METHODS", "ActivationsAndGradients", "BaseCAM", "ClassifierOutputTarget", "GradCAM",
           "LayerCAM", "SACAM", "make_cam", "INDEX_COLUMNS", "STORE_FORMAT", "CamStore", "FusedMaps",
           "merge_cam_stores", "shard_parts", "CamEntry", "CamStoreSettings", "click_entries", "image_entries",
           "prefer_channels_last", "write_cam_store"]
