"""``init_cfg=dict(type='CheckedPretrained', ...)``: mmengine's
``Pretrained`` init that fails when the checkpoint does not fit.

mmengine's ``PretrainedInit`` loads with ``strict=False`` and only logs the
keys it missed, so a checkpoint of another layout (a lego checkpoint where
an export is expected, another stem, depth or ViT arch, a wrong prefix)
leaves the module at its random init and training runs from scratch.
:class:`CheckedPretrainedInit` takes the same arguments, compares the
module's keys and shapes with what the stock loader would load, raises
:class:`CheckpointMismatchError` naming the cause and the fix, and else
loads with the stock ``PretrainedInit``.

Where it runs: ``BaseModule.init_weights`` (and some stock backbones) treat
the type name ``'Pretrained'`` specially. mmengine runs a ``'Pretrained'``
init after the children's ``init_weights``, any other type before them; a
ResNet's children have no init of their own, so that order does not matter
there. mmpretrain's ``ResNet`` skips ``zero_init_residual`` after a
``'Pretrained'`` load; this initializer turns that flag off on the module
it loads, so the loaded last norms stay. Backbones that re-initialise other
tensors unless the type is ``'Pretrained'`` (mmpretrain's and mmseg's
ViTs redraw ``pos_embed``, their layers the FFN) would lose the load: a
module with a ``pos_embed`` is refused, after the fit check, with the fix
(``'Pretrained'``). Any other re-initialisation after the load (a parent's
or a child's ``init_weights``) is caught at the module's first forward: the
loaded tensors are fingerprinted after the load and compared then, unless a
``load_state_dict`` (a resume) replaced them in between. ``LegoResNet`` and
``LegoViT`` load a ``CheckedPretrained`` checkpoint with their own loader
(:data:`PRETRAINED_TYPES`).
"""
import fnmatch
import re
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.model.weight_init import PretrainedInit
from mmengine.registry import WEIGHT_INITIALIZERS
from mmengine.runner.checkpoint import CheckpointLoader

from .lego.packed_state import unpack_state

__all__ = [
    'CheckedPretrainedInit', 'CheckpointMismatchError', 'PRETRAINED_TYPES'
]

#: ``init_cfg`` types that the lego backbones load with their own loader.
PRETRAINED_TYPES = ('Pretrained', 'CheckedPretrained')

StateDict = Dict[str, torch.Tensor]
_UNIT_KEY = re.compile(r'\.(units\.\d+|(weight|bias)\.\d+)(\.|$)')
_BLOCK_KEY = re.compile(r'^layer(\d+)\.(\d+)\.')
_VIT_LAYER_KEY = re.compile(r'^layers\.(\d+)\.')
_RESNET_DEPTHS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152
}
_SHOWN = 8  # keys listed per kind in an error


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the module it initialises."""


@WEIGHT_INITIALIZERS.register_module(name='CheckedPretrained')
class CheckedPretrainedInit(PretrainedInit):
    """Load a checkpoint like ``Pretrained``; fail if it does not fit.

    Args:
        checkpoint (str): The checkpoint (any mmengine ``CheckpointLoader``
            path: local file, ``http(s)://``, ``torchvision://``, ...).
        prefix (str, optional): Load only the keys under this prefix, with
            it stripped (e.g. ``'backbone.'``). Default: None (all keys).
        map_location (str): Where to map the tensors. Default: ``'cpu'``.
        allow_missing (Sequence[str]): ``fnmatch`` patterns of module keys
            that may be absent from the checkpoint and keep their initial
            values (e.g. ``['fc.*']``). Default: none.

    Raises:
        CheckpointMismatchError: no key has ``prefix``, or the module has
            keys the checkpoint lacks (not allowed), the checkpoint has keys
            the module lacks, or a tensor's shape differs; the message names
            the likely cause and its fix.
    """

    def __init__(self,
                 checkpoint: str,
                 prefix: Optional[str] = None,
                 map_location: str = 'cpu',
                 allow_missing: Sequence[str] = ()) -> None:
        super().__init__(checkpoint, prefix, map_location)
        self.allow_missing = list(allow_missing)

    def __call__(self, module: nn.Module) -> None:
        state = self.read_state()
        ours = module.state_dict()
        missing = [
            k for k in ours if k not in state and not any(
                fnmatch.fnmatchcase(k, p) for p in self.allow_missing)
        ]
        unexpected = [k for k in state if k not in ours]
        shapes = [(k, tuple(ours[k].shape), tuple(v.shape))
                  for k, v in state.items()
                  if k in ours and ours[k].shape != v.shape]
        if missing or unexpected or shapes:
            raise CheckpointMismatchError(
                self._message(module, state, missing, unexpected, shapes))
        if hasattr(module, 'pos_embed'):
            raise CheckpointMismatchError(
                f'{type(module).__name__} redraws pos_embed (and its '
                f'layers their FFN) after any init_cfg type but '
                f"'Pretrained', which would undo this load. The checkpoint "
                f"fits: give init_cfg=dict(type='Pretrained', "
                f"checkpoint='{self.checkpoint}', prefix={self.prefix!r}).")
        super().__call__(module)  # the stock load, now known to fit
        if getattr(module, 'zero_init_residual', False):
            module.zero_init_residual = False  # as after 'Pretrained'
        _guard_until_first_forward(module, list(state), self.checkpoint)

    def read_state(self) -> StateDict:
        """What the stock ``Pretrained`` loads: the checkpoint's
        ``state_dict`` (or its top level); without ``prefix`` every key,
        ``module.`` stripped (``load_checkpoint``), else the keys under
        ``prefix``, with it stripped (``_load_checkpoint_with_prefix``)."""
        ckpt = CheckpointLoader.load_checkpoint(
            self.checkpoint, map_location=self.map_location)
        state = ckpt.get('state_dict', ckpt)
        if not self.prefix:
            return {re.sub(r'^module\.', '', k): v for k, v in state.items()}
        prefix = self.prefix if self.prefix.endswith(
            '.') else self.prefix + '.'
        found = {
            k[len(prefix):]: v
            for k, v in state.items() if k.startswith(prefix)
        }
        if not found:
            heads = sorted({k.split('.', 1)[0] + '.' for k in state})
            raise CheckpointMismatchError(
                f'CheckedPretrained: no key of {self.checkpoint} starts with '
                f'prefix {prefix!r}; its keys start with {heads[:_SHOWN]}: '
                'set init_cfg.prefix to the sub-module to load (e.g. '
                "'backbone.'), or prefix=None for a bare backbone state dict")
        return found

    def _message(self, module: nn.Module, state: StateDict, missing: List[str],
                 unexpected: List[str], shapes: List[Tuple[str, tuple,
                                                           tuple]]) -> str:
        name = type(module).__name__
        where = self.checkpoint + (f' (prefix {self.prefix!r})'
                                   if self.prefix else '')
        lines = [
            f'CheckedPretrained: {where} does not fit {name}: '
            f'{len(missing)} missing keys (they would keep their random '
            f'init), {len(unexpected)} unexpected keys, {len(shapes)} shape '
            'mismatches.'
        ]
        causes = diagnose(module, state, missing, unexpected)
        lines += [f'- {c}' for c in causes] or [
            '- load a checkpoint of this architecture, or list the keys '
            f'{name} may keep at their initial values in '
            'init_cfg.allow_missing (fnmatch patterns)'
        ]
        for kind, keys in (('missing', missing), ('unexpected', unexpected)):
            if keys:
                more = f' (+{len(keys) - _SHOWN} more)' if len(
                    keys) > _SHOWN else ''
                lines.append(f'{kind}: {keys[:_SHOWN]}{more}')
        for key, want, got in shapes[:_SHOWN]:
            lines.append(f'shape of {key}: module {want}, checkpoint {got}')
        return '\n'.join(lines)


def _fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """Sums of squares and of magnitudes in float64, on the CPU: equal
    (to rounding) on any device, changed by any re-draw."""
    value = tensor.detach().double()
    return torch.stack([value.square().sum(), value.abs().sum()]).cpu()


def _guard_until_first_forward(module: nn.Module, keys: List[str],
                               checkpoint: str) -> None:
    """Raise at ``module``'s first forward if a floating tensor of
    ``keys`` changed since now; a ``load_state_dict`` into ``module`` in
    between (a resume) lifts the guard. A deep copy of ``module`` (an EMA
    model) carries the hook, which does nothing there."""
    state = module.state_dict()
    prints = {
        k: _fingerprint(state[k])
        for k in keys if state[k].is_floating_point()
    }
    owner = weakref.ref(module)
    handles = []

    def lift(*_) -> None:
        for handle in handles:
            handle.remove()

    def check(mod: nn.Module, _) -> None:
        if mod is not owner():
            return
        lift()
        now = mod.state_dict()
        changed = [
            k for k, p in prints.items() if k in now and
            not torch.allclose(_fingerprint(now[k]), p, rtol=1e-5, atol=1e-8)
        ]
        if changed:
            more = f' (+{len(changed) - _SHOWN} more)' if len(
                changed) > _SHOWN else ''
            raise CheckpointMismatchError(
                f'CheckedPretrained loaded {checkpoint} into '
                f'{type(mod).__name__}, but {len(changed)} of its tensors '
                f'were re-initialised before the first forward: '
                f'{changed[:_SHOWN]}{more}. An init_weights that runs after '
                "the load (the module's own, for any init_cfg type but "
                "'Pretrained', or a parent's) redrew them: use "
                "init_cfg=dict(type='Pretrained', ...), which mmengine runs "
                'last, or remove the re-initialisation.')

    handles.append(module.register_forward_pre_hook(check))
    handles.append(module.register_load_state_dict_pre_hook(lift))


def diagnose(module: nn.Module, state: StateDict, missing: List[str],
             unexpected: List[str]) -> List[str]:
    """The likely causes of a mismatch between ``module`` and ``state``
    (its checkpoint's keys, prefix stripped), each with its fix."""
    ours = module.state_dict()
    lego = _lego_kind(state)
    if lego and not _lego_kind(ours):
        tool, other = ('lego2vit.py', 'lego2resnet.py') if (
            lego == 'LegoViT') else ('lego2resnet.py', 'lego2vit.py')
        return [
            f'the checkpoint holds a {lego} (lego units, router logits, '
            'lego layout), not a dense backbone: export one task\'s '
            f'sub-network with tools/model_converters/{tool} CKPT TASK OUT '
            f'(or {other}) and load the export, or use the route-copy way '
            '(docs/downstream.md)'
        ]
    causes = []
    heads = {k.split('.', 1)[0] for k in state}
    if len(missing) == len(ours) and len(heads) < len(state):
        fits = sorted(
            h for h in heads
            if h and any(k[len(h) + 1:] in ours
                         for k in state if k.startswith(h + '.')))
        if fits:
            causes.append(
                'no checkpoint key fits as it is, but keys under '
                f'{[f + "." for f in fits]} do: set init_cfg.prefix to the '
                'sub-module to load')
    deep = {
        'module': any(k.startswith('stem.') for k in ours),
        'checkpoint': any(k.startswith('stem.') for k in state)
    }
    if deep['module'] != deep['checkpoint'] and any(
            k.startswith(('conv1.', 'stem.')) for k in state):
        has, other = ('checkpoint',
                      'module') if deep['checkpoint'] else ('module',
                                                            'checkpoint')
        causes.append(
            f'deep_stem mismatch: the {has} has a deep stem (stem.*), the '
            f'{other} the 7x7 stem (conv1/bn1): set '
            f'deep_stem={deep["checkpoint"]} on the backbone (a GPPF-R50 '
            'export has the 7x7 stem)')
    depths = _resnet_depth(ours), _resnet_depth(state)
    if depths[0] != depths[1] and depths[1][0]:
        (ours_blocks, ours_depth), (ckpt_blocks, ckpt_depth) = depths
        if len(ckpt_blocks) != len(ours_blocks):
            fix = f'set num_stages={len(ckpt_blocks)}'
        elif ckpt_depth:
            fix = f'set depth={ckpt_depth}'
        else:
            fix = f'set the blocks per stage to {ckpt_blocks}'
        causes.append(
            f'ResNet depth mismatch: the checkpoint has {ckpt_blocks} blocks '
            f'per stage (depth {ckpt_depth or "?"}), the module '
            f'{ours_blocks} (depth {ours_depth or "?"}): {fix}')
    vit = _vit_arch(ours), _vit_arch(state)
    if vit[1] and vit[0] != vit[1]:
        dims, layers = vit[1]
        zoo = getattr(type(module), 'arch_zoo', {})
        names = sorted(n for n, a in zoo.items()
                       if (a.get('embed_dims'), a.get('num_layers')) == vit[1])
        named = f"arch='{names[0]}' or " if names else ''
        causes.append(
            f'ViT arch mismatch: the checkpoint has embed_dims={dims}, '
            f'num_layers={layers}, the module embed_dims={vit[0][0]}, '
            f'num_layers={vit[0][1]}: set {named}arch=dict(embed_dims='
            f'{dims}, num_layers={layers}, num_heads=..., '
            'feedforward_channels=...) as the checkpoint was trained')
    return causes


def _lego_kind(state: StateDict) -> Optional[str]:
    """``'LegoResNet'``/``'LegoViT'`` if ``state`` is a lego backbone's."""
    layout = {}
    if '_extra_state' in state:
        try:
            layout = unpack_state(state['_extra_state']).get('lego_layout', {})
        except Exception:  # another module's extra state
            layout = {}
    if layout or 'router.logits' in state or any(
            _UNIT_KEY.search(k) for k in state):
        vit = layout.get('backbone') == 'LegoViT' or any(
            k.startswith('layers.') for k in state)
        return 'LegoViT' if vit else 'LegoResNet'
    return None


def _resnet_depth(state: StateDict) -> Tuple[tuple, Optional[int]]:
    """Blocks per stage (``layerN.M.`` keys) and the ResNet depth."""
    blocks: Dict[int, int] = {}
    for key in state:
        m = _BLOCK_KEY.match(key)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    counts = tuple(blocks[s] for s in sorted(blocks))
    bottleneck = any(k.startswith('layer1.0.conv3.') for k in state)
    return counts, _RESNET_DEPTHS.get((counts, bottleneck))


def _vit_arch(state: StateDict) -> Optional[Tuple[int, int]]:
    """``(embed_dims, num_layers)`` of a ViT state dict, else None."""
    embed = state.get('patch_embed.projection.weight', state.get('cls_token'))
    layers = [int(m.group(1)) for m in map(_VIT_LAYER_KEY.match, state) if m]
    if embed is None or not layers:
        return None
    dims = embed.shape[0] if embed.dim() == 4 else embed.shape[-1]
    return int(dims), max(layers) + 1
