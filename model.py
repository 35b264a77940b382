"""Segmentation models on timm encoders: UNet++, UNet, DeepLabV3+, UperNet and SegFormer, behind a small registry.

    model = create_model("unetpp", "effb4", num_classes=11)
    logits = model(images)  # N,C,H,W floats -> N,num_classes,H,W logits, any H and W

Every model pads its input to a multiple of the encoder stride and crops the logits back, so
odd sizes such as 500x375 work. Encoders come from timm (`features_only=True`); short aliases
live in ENCODER_ALIASES and any other timm name passes through unchanged.
"""
import inspect
import os

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import IMAGENET_MEAN, IMAGENET_STD, UserError, load_checkpoint


# Short encoder names -> timm names; the tags pick weights that exist on the timm hub.
# effb6/effb7 only have hub weights as TensorFlow ports ("same" padding, a little slower).
ENCODER_ALIASES = {
    "effb0": "efficientnet_b0.ra_in1k",
    "effb1": "efficientnet_b1.ft_in1k",
    "effb2": "efficientnet_b2.ra_in1k",
    "effb3": "efficientnet_b3.ra2_in1k",
    "effb4": "efficientnet_b4.ra2_in1k",
    "effb5": "efficientnet_b5.sw_in12k_ft_in1k",
    "effb6": "tf_efficientnet_b6.ns_jft_in1k",
    "effb7": "tf_efficientnet_b7.ns_jft_in1k",
    "effv2s": "tf_efficientnetv2_s.in21k_ft_in1k",
    "r18": "resnet18.a1_in1k",
    "r34": "resnet34.a1_in1k",
    "r50": "resnet50.a1_in1k",
    "r101": "resnet101.a1h_in1k",
    "rx50": "resnext50_32x4d.a1h_in1k",
    "regy32": "regnety_032.ra_in1k",
    "mnv3": "mobilenetv3_large_100.ra_in1k",
    "cnxt": "convnext_tiny.fb_in22k_ft_in1k",
    "cnxt-s": "convnext_small.fb_in22k_ft_in1k",
    "swin": "swin_tiny_patch4_window7_224.ms_in22k_ft_in1k",
    "swin-s": "swin_small_patch4_window7_224.ms_in22k_ft_in1k",
    "swin-b": "swin_base_patch4_window7_224.ms_in22k_ft_in1k",
}

ENCODER_STRIDES = (2, 4, 8, 16, 32)  # level i of every decoder sits at stride 2 ** (i + 1)


def resolve_encoder(name):
    """Alias or timm name -> timm name."""
    return ENCODER_ALIASES.get(name, name)


def encoder_normalization(encoder):
    """(mean, std) the encoder's pretrained weights expect; ImageNet statistics when unknown."""
    cfg = timm.models.get_pretrained_cfg(resolve_encoder(encoder))  # registry lookup, no download
    if cfg is None or cfg.mean is None or cfg.std is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(cfg.mean), tuple(cfg.std)


# ---------------------------------------------------------------------------------------------
# Registry


_MODEL_BUILDERS = {}


def register_model(builder):
    """Register a model builder under its function name."""
    _MODEL_BUILDERS[builder.__name__] = builder
    return builder


def list_models():
    return sorted(_MODEL_BUILDERS)


def create_model(name, encoder, num_classes, in_channels=3, pretrained=False, weights=None, **kwargs):
    """Build a registered model on a timm encoder.

    pretrained=True downloads the encoder's timm hub weights; weights=PATH loads a local state
    dict (.pth/.pt) or .safetensors file of the timm model instead, which works offline.
    Other keyword arguments go to the model builder (see each builder's docstring).
    """
    if name not in _MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    options = [p for p in inspect.signature(_MODEL_BUILDERS[name]).parameters if p not in ("encoder", "num_classes")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(f"model {name!r} has no option {', '.join(map(repr, unknown))}; its options: {', '.join(options)}")
    return _MODEL_BUILDERS[name](
        encoder, num_classes=num_classes, in_channels=in_channels, pretrained=pretrained, weights=weights, **kwargs
    )


# ---------------------------------------------------------------------------------------------
# Encoder


def load_weights_file(path):
    """State dict from a .safetensors file or a torch checkpoint (optionally under 'state_dict'/'model')."""
    path = os.fspath(path)
    fix = "pass --weights a .pth/.pt state dict or a .safetensors file of the timm encoder"
    if not os.path.isfile(path):
        raise UserError(f"encoder weights {path} do not exist: {fix}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as err:
            raise UserError(f"encoder weights {path} cannot be read ({err}): {fix}") from None
    state = load_checkpoint(path, fix=fix)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def _create_timm_model(name, pretrained, weights, **kwargs):
    if weights is not None:
        # Handing timm the state dict lets it drop the classifier and adapt the stem to in_chans.
        overlay = {"state_dict": load_weights_file(weights)}
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if not pretrained:
            raise
        cfg = timm.models.get_pretrained_cfg(name)
        source = f"https://huggingface.co/{cfg.hf_hub_id}" if cfg and cfg.hf_hub_id else "the timm hub"
        reason = str(err).split("\n")[0]
        raise UserError(
            f"could not download the pretrained weights of encoder {name!r} ({reason}). Offline? Download "
            f"model.safetensors from {source} on a connected machine and pass --weights PATH instead of --pretrained"
        ) from None


class EncoderCannotDilate(ValueError):
    """The timm model has no output_stride option (Swin and other window-attention models)."""


class Encoder(nn.Module):
    """A timm backbone returning NCHW feature maps at strides 2 (or 4), 4, 8, 16 and 32.

    `levels[k]` is the decoder level of the k-th feature (level i = stride 2 ** (i + 1)), so
    CNNs give levels 0-4 and transformer-style backbones (first feature at stride 4) give 1-4.
    With output_stride 8 or 16 the deepest stages are dilated instead of downsampled (DeepLab).
    """

    def __init__(self, name, in_channels=3, output_stride=32, pretrained=False, weights=None, **timm_kwargs):
        super().__init__()
        name = resolve_encoder(name)
        if name.startswith("swin"):
            timm_kwargs.setdefault("strict_img_size", False)  # windows are padded, any multiple of 32 works
        with torch.device("meta"):  # cheap probe of the nominal feature strides
            probe = timm.create_model(name, features_only=True, **timm_kwargs)
        index_of_stride = {r: i for i, r in enumerate(probe.feature_info.reduction()) if r in ENCODER_STRIDES}
        if 32 not in index_of_stride:
            raise ValueError(f"encoder {name!r} has no stride-32 feature map: {probe.feature_info.reduction()}")
        if output_stride != 32:
            timm_kwargs["output_stride"] = output_stride
        try:
            self.model = _create_timm_model(
                name, pretrained, weights, features_only=True, in_chans=in_channels,
                out_indices=tuple(sorted(index_of_stride.values())), **timm_kwargs,
            )
        except TypeError as err:  # timm passes unknown keyword arguments on to the model class
            if "output_stride" not in str(err):
                raise
            raise EncoderCannotDilate(f"encoder {name!r} cannot dilate to output_stride={output_stride}") from err
        self.name = name
        self.in_channels = in_channels
        self.levels = [ENCODER_STRIDES.index(r) for r in sorted(index_of_stride)]
        self.channels = self.model.feature_info.channels()
        self.stride = max(self.model.feature_info.reduction())  # input sizes must be multiples of this
        self.nhwc = getattr(self.model, "output_fmt", "NCHW") == "NHWC"

    def forward(self, x):
        features = self.model(x)
        if self.nhwc:  # a permuted view is a channels_last NCHW tensor: no copy needed
            features = [f.permute(0, 3, 1, 2) for f in features]
        return features


# ---------------------------------------------------------------------------------------------
# Building blocks


class ConvBnAct(nn.Sequential):
    """Conv (optionally depthwise-separable) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size=3, dilation=1, separable=False):
        padding = dilation * (kernel_size // 2)
        if separable:
            convs = [
                nn.Conv2d(in_channels, in_channels, kernel_size, padding=padding, dilation=dilation,
                          groups=in_channels, bias=False),
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
            ]
        else:
            convs = [nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False)]
        super().__init__(*convs, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze & excitation (Roy et al., 2018)."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.channel_gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )
        self.spatial_gate = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x):
        return x * (self.channel_gate(x) + self.spatial_gate(x))


def _attention(kind, channels):
    if kind is None:
        return nn.Identity()
    if kind == "scse":
        return SCSE(channels)
    raise ValueError(f"unknown attention {kind!r}; use None or 'scse'")


class UpsampleConcatConv(nn.Conv2d):
    """3x3 conv over cat(upsample_nearest_2x(x), skip), without building the upsampled map.

    Nearest 2x upsampling followed by a 3-tap conv is a stride-2 transposed conv with 4 taps: each
    upsampled pixel repeats an input pixel, so taps landing on the same input pixel add up to
    (w2, w1 + w2, w0 + w1, w0) per axis. That is 16 instead of 36 multiply-adds per input pixel
    and channel pair. The skip part is an ordinary conv. The weight is the 3x3 weight of the
    concatenated conv, so parameters map one to one to the plain formulation.
    """

    def __init__(self, in_channels, skip_channels, out_channels):
        super().__init__(in_channels + skip_channels, out_channels, 3, padding=1, bias=False)
        self.upsampled_channels = in_channels
        taps = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
        self.register_buffer("taps", taps, persistent=False)

    def forward(self, x, skip=None):
        weight_up, weight_skip = self.weight.split(
            [self.upsampled_channels, self.in_channels - self.upsampled_channels], dim=1
        )
        kernel = torch.einsum("kp,oipq,lq->iokl", self.taps, weight_up, self.taps)  # (in, out, 4, 4)
        out = F.conv_transpose2d(x, kernel, self.bias, stride=2, padding=1)
        if skip is not None:
            out = out + F.conv2d(skip, weight_skip, padding=1)
        return out


class UpFuseBlock(nn.Module):
    """Upsample x2 (nearest), concatenate the skip, then two 3x3 conv-BN-ReLU (optional scSE
    attention on the concatenation and on the output)."""

    def __init__(self, in_channels, skip_channels, out_channels, attention=None):
        super().__init__()
        fused = in_channels + skip_channels
        self.attention_in = _attention(attention, fused) if attention and skip_channels else None
        if self.attention_in is None:
            self.conv1 = UpsampleConcatConv(in_channels, skip_channels, out_channels)
        else:  # attention needs the upsampled concatenation itself
            self.conv1 = nn.Conv2d(fused, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = ConvBnAct(out_channels, out_channels)
        self.attention_out = _attention(attention, out_channels)

    def forward(self, x, skip=None):
        if self.attention_in is None:
            x = self.conv1(x, skip)
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = self.conv1(self.attention_in(torch.cat([x, skip], dim=1)))
        return self.attention_out(self.conv2(self.act1(self.bn1(x))))


class UNetDecoder(nn.Module):
    """UNet++ decoder: nested dense skip pathways (Zhou et al., 2018); nested=False gives a UNet.

    Node X^{i,j} sits at level i (stride 2 ** (i + 1)) in column j; column 0 is the encoder.
    X^{i,j} upsamples X^{i+1,j-1} and fuses it with all earlier nodes of its level,
    X^{i,j-1} ... X^{i,0} (the order segmentation_models_pytorch uses, so weights map one to one).
    Main-path nodes (i + j = 4) have decoder_channels[j - 1] channels, nested nodes keep their
    level's encoder width. A last block takes X^{0,4} (stride 2) to full resolution with
    decoder_channels[4] channels. Levels without an encoder feature (stride 2 of transformer-style
    encoders) get no nested nodes and give no skip.
    """

    def __init__(self, encoder_levels, encoder_channels, decoder_channels=(256, 128, 64, 32, 16),
                 attention=None, nested=True):
        super().__init__()
        depth = len(ENCODER_STRIDES) - 1
        if len(decoder_channels) != depth + 1:
            raise ValueError(f"decoder_channels needs {depth + 1} entries, got {decoder_channels}")
        self.encoder_levels = list(encoder_levels)
        level_width = dict(zip(encoder_levels, encoder_channels))
        width = {(i, 0): c for i, c in level_width.items()}  # channels of every node X^{i,j}
        self.positions = []  # (i, j) of each node, in a valid evaluation order
        self.nodes = nn.ModuleDict()
        for j in range(1, depth + 1):
            for i in range(depth + 1 - j):
                on_main_path = i + j == depth
                if not on_main_path and not (nested and i in level_width):
                    continue
                skip_width = sum(width[(i, k)] for k in range(j) if (i, k) in width)
                width[(i, j)] = decoder_channels[j - 1] if on_main_path else level_width[i]
                self.nodes[f"x_{i}_{j}"] = UpFuseBlock(width[(i + 1, j - 1)], skip_width, width[(i, j)], attention)
                self.positions.append((i, j))
        self.to_full_resolution = UpFuseBlock(decoder_channels[depth - 1], 0, decoder_channels[depth], attention)
        # Nested nodes of the finest encoder level: the deep-supervision taps.
        self.top_row = [(i, j) for i, j in self.positions if i == min(encoder_levels) and i + j < depth]
        self.top_row_channels = [width[p] for p in self.top_row]

    def forward(self, features):
        """features: encoder maps in encoder_levels order -> (full-resolution map, top-row nodes)."""
        grid = {(i, 0): f for i, f in zip(self.encoder_levels, features)}
        for (i, j), node in zip(self.positions, self.nodes.values()):
            skips = [grid[(i, k)] for k in reversed(range(j)) if (i, k) in grid]
            skip = torch.cat(skips, dim=1) if len(skips) > 1 else (skips[0] if skips else None)
            grid[(i, j)] = node(grid[(i + 1, j - 1)], skip)
        full = self.to_full_resolution(grid[(0, len(ENCODER_STRIDES) - 1)])
        return full, [grid[p] for p in self.top_row]


class ImagePooling(nn.Module):
    """ASPP's global-context branch: average pool, 1x1 conv, broadcast back.

    It has no BatchNorm: after pooling there is one value per channel and image, which BatchNorm
    cannot normalise in training at batch size 1. The conv has a bias instead.
    """

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        pooled = self.act(self.conv(x.mean(dim=(2, 3), keepdim=True)))
        # materialised in x's layout: concatenating a broadcast view would fall back to NCHW
        return pooled.expand(-1, -1, x.shape[2], x.shape[3]).contiguous(memory_format=torch.channels_last)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, three dilated 3x3 branches, image pooling."""

    def __init__(self, in_channels, out_channels, rates, separable=True, dropout=0.5):
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvBnAct(in_channels, out_channels, 1)]
            + [ConvBnAct(in_channels, out_channels, 3, dilation=r, separable=separable) for r in rates]
        )
        self.image_pooling = ImagePooling(in_channels, out_channels)
        self.project = nn.Sequential(
            ConvBnAct(out_channels * (len(rates) + 2), out_channels, 1), nn.Dropout(dropout)
        )

    def forward(self, x):
        return self.project(torch.cat([b(x) for b in self.branches] + [self.image_pooling(x)], dim=1))


class DeepLabV3PlusDecoder(nn.Module):
    """ASPP on the deepest features, upsampled to stride 4 and fused with a 48-channel projection
    of the stride-4 features by a separable 3x3 conv (Chen et al., 2018)."""

    def __init__(self, low_channels, high_channels, channels=256, rates=(6, 12, 18), aspp_separable=True,
                 aspp_dropout=0.5, low_level_channels=48):
        super().__init__()
        self.aspp = nn.Sequential(
            ASPP(high_channels, channels, rates, aspp_separable, aspp_dropout),
            ConvBnAct(channels, channels, 3, separable=True),
        )
        self.low_level = ConvBnAct(low_channels, low_level_channels, 1)
        self.fuse = ConvBnAct(channels + low_level_channels, channels, 3, separable=True)

    def forward(self, low, high):
        # align_corners=True matches the reference DeepLab implementation
        high = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=True)
        return self.fuse(torch.cat([high, self.low_level(low)], dim=1))


def adaptive_avg_pool_matrix(size, bins, device=None, dtype=None):
    """(bins, size) matrix that averages like nn.AdaptiveAvgPool along one axis.

    Bin i averages positions floor(i * size / bins) .. ceil((i + 1) * size / bins) - 1, the
    regions PyTorch's kernel uses; neighbouring bins overlap when bins does not divide size.
    """
    bin_index = torch.arange(bins, device=device)
    start = bin_index * size // bins
    end = ((bin_index + 1) * size + bins - 1) // bins
    position = torch.arange(size, device=device)
    inside = (position >= start[:, None]) & (position < end[:, None])
    return inside.to(dtype) / (end - start)[:, None].to(dtype)


class ExactAdaptiveAvgPool2d(nn.Module):
    """nn.AdaptiveAvgPool2d as two small matrix products, so exported graphs stay exact.

    ONNX export turns adaptive pooling into an AveragePool with one fixed kernel, which is wrong
    when the output size does not divide the input size (pytorch issues #42653, #64806). The
    matrices here come from the feature's own size, so every exported graph computes the same
    region averages as PyTorch.
    """

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def forward(self, x):
        rows = adaptive_avg_pool_matrix(x.shape[-2], self.output_size, x.device, x.dtype)
        cols = adaptive_avg_pool_matrix(x.shape[-1], self.output_size, x.device, x.dtype)
        return torch.einsum("ih,nchw,jw->ncij", rows, x, cols)


def _resize(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module as UperNet uses it: the features average-pooled to each
    scale's grid, projected by a 1x1 conv, upsampled back, concatenated with the features and
    fused by a 3x3 conv.

    The pooled branches have no BatchNorm (a conv bias instead), like ImagePooling: a 1x1 grid
    holds one value per channel and image, which BatchNorm cannot normalise at batch size 1.
    """

    def __init__(self, in_channels, channels, scales=(1, 2, 3, 6)):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(ExactAdaptiveAvgPool2d(s), nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=True))
            for s in scales
        )
        self.bottleneck = ConvBnAct(in_channels + len(scales) * channels, channels, 3)

    def forward(self, x):
        pooled = [_resize(branch(x), x.shape[-2:]) for branch in self.branches]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UperNetDecoder(nn.Module):
    """UperNet's head (Xiao et al., 2018) on the four stages at strides 4, 8, 16 and 32.

    Pyramid pooling on the last stage starts an FPN top-down path: each earlier stage gets a 1x1
    lateral conv plus the upsampled level above, then a 3x3 output conv. All levels are resized
    to stride 4, concatenated and fused by a 3x3 conv.
    """

    def __init__(self, in_channels, channels=512, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.lateral = nn.ModuleList(ConvBnAct(c, channels, 1) for c in in_channels[:-1])
        self.output = nn.ModuleList(ConvBnAct(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvBnAct(len(in_channels) * channels, channels, 3)

    def forward(self, features):
        """features: stride 4 ... stride 32 maps -> fused map at stride 4."""
        top = self.ppm(features[-1])
        levels = [top]  # stride 32 first
        for lateral, output, x in zip(self.lateral[::-1], self.output[::-1], features[-2::-1]):
            top = lateral(x) + _resize(top, x.shape[-2:])
            levels.insert(0, output(top))
        size = levels[0].shape[-2:]
        return self.fuse(torch.cat([levels[0]] + [_resize(x, size) for x in levels[1:]], dim=1))


class FCNHead(nn.Sequential):
    """The auxiliary head trained beside UperNet (MMSegmentation's FCNHead): 3x3 conv-BN-ReLU,
    dropout, 1x1 classifier."""

    def __init__(self, in_channels, num_classes, channels=256, dropout=0.1):
        super().__init__(ConvBnAct(in_channels, channels, 3), nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))


class SegFormerDecoder(nn.Module):
    """SegFormer's all-MLP head (Xie et al., 2021): a linear (1x1) projection of each stage to
    one width, resized to stride 4, concatenated and fused by a 1x1 conv-BN-ReLU.

    Projecting before resizing is the same linear map and much cheaper at stride 4.
    """

    def __init__(self, in_channels, channels=256):
        super().__init__()
        self.project = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = ConvBnAct(len(in_channels) * channels, channels, 1)

    def forward(self, features):
        """features: stride 4 ... stride 32 maps -> fused map at stride 4."""
        size = features[0].shape[-2:]
        projected = [project(x) for project, x in zip(self.project, features)]
        return self.fuse(torch.cat([projected[0]] + [_resize(x, size) for x in projected[1:]], dim=1))


def _init_decoder(module):
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# Models


class SegmentationModel(nn.Module):
    """Encoder + decoder + head. Pads the input to the encoder stride and crops the logits back.

    Activations run in channels_last memory format (oneDNN's native layout on CPU, tensor-core
    friendly on GPU); the logits are ordinary N,C,H,W tensors with channels_last strides.
    """

    aux_weights = ()  # loss weights of the extra outputs a model returns in train mode, after the logits

    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder = encoder
        self.num_classes = num_classes
        self.in_channels = encoder.in_channels

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels or not x.is_floating_point():
            # say what is expected here, not in a conv's message deep inside the encoder
            raise ValueError(f"expected float images of shape N x {self.in_channels} x H x W, "
                             f"got a {x.dtype} tensor of shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.encoder.stride, -width % self.encoder.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        out = self.segment(x.contiguous(memory_format=torch.channels_last))
        if isinstance(out, list):
            return [o[..., :height, :width] for o in out]
        return out[..., :height, :width]

    def segment(self, x):
        """Logits for an input whose size is a multiple of the encoder stride."""
        raise NotImplementedError


class UNet(SegmentationModel):
    """UNet++ (nested=True) or UNet (nested=False) with a 3x3 conv head at full resolution.

    With deep_supervision=True (UNet++ only) a 1x1 head is added on each nested node of the
    finest level (X^{0,1..3} for CNN encoders); in train mode forward then returns a list
    [main logits, aux logits X^{0,1}, X^{0,2}, ...], all at the input size, each aux output
    weighted aux_weight in the loss (1: the paper's equal weights). In eval mode, and always when
    deep_supervision=False, it returns the main logits tensor only.
    """

    def __init__(self, encoder, num_classes, decoder_channels=(256, 128, 64, 32, 16), attention=None,
                 nested=True, deep_supervision=False, aux_weight=1.0):
        super().__init__(encoder, num_classes)
        if deep_supervision and not nested:
            raise ValueError("deep supervision needs the nested nodes of UNet++")
        self.decoder = UNetDecoder(encoder.levels, encoder.channels, decoder_channels, attention, nested)
        self.head = nn.Conv2d(decoder_channels[-1], num_classes, 3, padding=1)
        self.aux_heads = None
        if deep_supervision:
            self.aux_heads = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in self.decoder.top_row_channels)
            self.aux_weights = (_check_aux_weight(aux_weight),) * len(self.aux_heads)
        _init_decoder(self.decoder)

    def segment(self, x):
        full, top_row = self.decoder(self.encoder(x))
        logits = self.head(full)
        if self.aux_heads is None or not self.training:
            return logits
        size = x.shape[-2:]
        aux = [F.interpolate(h(f), size=size, mode="bilinear", align_corners=False)
               for h, f in zip(self.aux_heads, top_row)]
        return [logits, *aux]


class DeepLabV3Plus(SegmentationModel):
    """DeepLabV3+ with a 1x1 conv head at stride 4, upsampled bilinearly to the input size."""

    def __init__(self, encoder, num_classes, channels=256, rates=None, aspp_separable=True, aspp_dropout=0.5):
        super().__init__(encoder, num_classes)
        if 1 not in encoder.levels:
            raise ValueError(f"encoder {encoder.name!r} has no stride-4 feature map for the decoder")
        self.low_index = encoder.levels.index(1)
        if rates is None:  # (6, 12, 18) at output stride 16, doubled at 8
            rates = tuple(r * 16 // encoder.stride for r in (6, 12, 18))
        self.decoder = DeepLabV3PlusDecoder(
            encoder.channels[self.low_index], encoder.channels[-1], channels, rates, aspp_separable, aspp_dropout
        )
        self.head = nn.Conv2d(channels, num_classes, 1)
        _init_decoder(self.decoder)

    def segment(self, x):
        features = self.encoder(x)
        logits = self.head(self.decoder(features[self.low_index], features[-1]))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)


def _check_aux_weight(weight):
    if not (isinstance(weight, (int, float)) and 0 <= weight < float("inf")):
        raise ValueError(f"aux_weight must be a number >= 0, got {weight!r}")
    return float(weight)


def _stage_indices(encoder):
    """Positions in the encoder's outputs of its stride 4, 8, 16 and 32 maps: the four stages
    hierarchical transformers have, which UperNet and SegFormer read (a CNN's stride 2 is unused)."""
    missing = [ENCODER_STRIDES[level] for level in (1, 2, 3, 4) if level not in encoder.levels]
    if missing:
        raise ValueError(f"encoder {encoder.name!r} has no feature map at stride {missing}; pick another encoder")
    return [encoder.levels.index(level) for level in (1, 2, 3, 4)]


class UperNet(SegmentationModel):
    """UperNet head with dropout and a 1x1 classifier at stride 4, upsampled bilinearly.

    With aux_weight > 0 an FCN head on the stride-16 stage is trained beside it: in train mode
    forward returns [logits, aux logits], both at the input size, and the loss weights the aux
    term aux_weight (0.4, as MMSegmentation). Eval mode and exported graphs use the logits alone.
    """

    def __init__(self, encoder, num_classes, channels=512, pool_scales=(1, 2, 3, 6), aux_weight=0.4,
                 aux_channels=256, dropout=0.1):
        super().__init__(encoder, num_classes)
        self.stages = _stage_indices(encoder)
        stage_channels = [encoder.channels[i] for i in self.stages]
        self.decoder = UperNetDecoder(stage_channels, channels, tuple(pool_scales))
        self.head = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))
        self.aux_head = None
        if _check_aux_weight(aux_weight) > 0:
            self.aux_head = FCNHead(stage_channels[2], num_classes, aux_channels, dropout)
            self.aux_weights = (float(aux_weight),)
            _init_decoder(self.aux_head[0])
        _init_decoder(self.decoder)

    def segment(self, x):
        features = self.encoder(x)
        stages = [features[i] for i in self.stages]
        logits = _resize(self.head(self.decoder(stages)), x.shape[-2:])
        if self.aux_head is None or not self.training:
            return logits
        return [logits, _resize(self.aux_head(stages[2]), x.shape[-2:])]


class SegFormer(SegmentationModel):
    """SegFormer's all-MLP head with dropout and a 1x1 classifier at stride 4, upsampled bilinearly."""

    def __init__(self, encoder, num_classes, channels=256, dropout=0.1):
        super().__init__(encoder, num_classes)
        self.stages = _stage_indices(encoder)
        self.decoder = SegFormerDecoder([encoder.channels[i] for i in self.stages], channels)
        self.head = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))
        _init_decoder(self.decoder)

    def segment(self, x):
        features = self.encoder(x)
        logits = self.head(self.decoder([features[i] for i in self.stages]))
        return _resize(logits, x.shape[-2:])


@register_model
def unetpp(encoder, num_classes, in_channels=3, pretrained=False, weights=None, decoder_channels=(256, 128, 64, 32, 16),
           attention=None, deep_supervision=False, aux_weight=1.0, encoder_kwargs=None):
    """UNet++. attention: None or 'scse'. deep_supervision, aux_weight: see UNet. encoder_kwargs go to timm."""
    enc = Encoder(encoder, in_channels, pretrained=pretrained, weights=weights, **(encoder_kwargs or {}))
    return UNet(enc, num_classes, decoder_channels, attention, nested=True, deep_supervision=deep_supervision,
                aux_weight=aux_weight)


@register_model
def unet(encoder, num_classes, in_channels=3, pretrained=False, weights=None, decoder_channels=(256, 128, 64, 32, 16),
         attention=None, encoder_kwargs=None):
    """UNet: the UNet++ decoder without nested nodes."""
    enc = Encoder(encoder, in_channels, pretrained=pretrained, weights=weights, **(encoder_kwargs or {}))
    return UNet(enc, num_classes, decoder_channels, attention, nested=False)


@register_model
def deeplabv3p(encoder, num_classes, in_channels=3, pretrained=False, weights=None, output_stride=None,
               decoder_channels=256, atrous_rates=None, aspp_separable=True, aspp_dropout=0.5, encoder_kwargs=None):
    """DeepLabV3+. output_stride 8 or 16; the default None is 16, or 32 for encoders that cannot
    dilate (Swin). atrous_rates default (6, 12, 18) * 16 / output_stride."""
    if output_stride not in (None, 8, 16):
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    try:
        enc = Encoder(encoder, in_channels, output_stride or 16, pretrained, weights, **(encoder_kwargs or {}))
    except EncoderCannotDilate:
        if output_stride is not None:
            raise
        enc = Encoder(encoder, in_channels, 32, pretrained, weights, **(encoder_kwargs or {}))
    return DeepLabV3Plus(enc, num_classes, decoder_channels, atrous_rates, aspp_separable, aspp_dropout)


@register_model
def upernet(encoder, num_classes, in_channels=3, pretrained=False, weights=None, decoder_channels=512,
            pool_scales=(1, 2, 3, 6), aux_weight=0.4, aux_channels=256, dropout=0.1, encoder_kwargs=None):
    """UperNet. aux_weight: loss weight of the auxiliary FCN head on the stride-16 stage (0: no head)."""
    enc = Encoder(encoder, in_channels, pretrained=pretrained, weights=weights, **(encoder_kwargs or {}))
    return UperNet(enc, num_classes, decoder_channels, pool_scales, aux_weight, aux_channels, dropout)


@register_model
def segformer(encoder, num_classes, in_channels=3, pretrained=False, weights=None, decoder_channels=256, dropout=0.1,
              encoder_kwargs=None):
    """SegFormer's all-MLP head on any hierarchical encoder (the paper's MiT, Swin, ConvNeXt, CNNs)."""
    enc = Encoder(encoder, in_channels, pretrained=pretrained, weights=weights, **(encoder_kwargs or {}))
    return SegFormer(enc, num_classes, decoder_channels, dropout)
