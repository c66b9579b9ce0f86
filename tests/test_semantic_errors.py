"""Semantic errors: exact full text (file:line:col, message, source line, caret) for bad
specs; several errors in one spec are reported together."""
import pytest

import attncc


def error_text(text, filename="bad.attn", **params):
    with pytest.raises(attncc.SpecError) as e:
        attncc.parse(text, filename=filename, **params)
    return str(e.value)


CASES = {
    'unknown_name': (
        'pattern w(width = 4)\nmask causal & q - k < widht\n',
        "bad.attn:2:23: error: unknown name 'widht' (did you mean 'width'?)\n"
        '  mask causal & q - k < widht\n'
        '                        ^~~~~'),
    'unknown_primitive': (
        'pattern c\nmask casual & q - k < 4\n',
        "bad.attn:2:6: error: unknown primitive 'casual' (did you mean 'causal'?)\n"
        '  mask casual & q - k < 4\n'
        '       ^~~~~~'),
    'unknown_axis': (
        'pattern g\nlayout grid(y = 4, x = 4)\nmask q.z == k.y\n',
        "bad.attn:3:6: error: unknown axis 'z' (the layout has axes y, x)\n"
        '  mask q.z == k.y\n'
        '       ^~~'),
    'coord_no_layout': (
        'pattern g\nmask q.y == k.y\n',
        "bad.attn:2:6: error: coordinate 'q.y' needs a layout (add e.g. 'layout grid(y = 64, x = 64)')\n"
        '  mask q.y == k.y\n'
        '       ^~~\n'
        "bad.attn:2:13: error: coordinate 'k.y' needs a layout (add e.g. 'layout grid(y = 64, x = 64)')\n"
        '  mask q.y == k.y\n'
        '              ^~~'),
    'unknown_input': (
        'pattern d\ninput doc: int[b, k]\nmask dco[b, q] == doc[b, k]\n',
        "bad.attn:3:6: error: unknown input 'dco' (did you mean 'doc'?)\n"
        '  mask dco[b, q] == doc[b, k]\n'
        '       ^~~~~~~~~'),
    'index_count': (
        'pattern d\ninput doc: int[b, k]\nmask doc[q] == doc[b, k]\n',
        "bad.attn:3:6: error: input 'doc' has 2 dimensions [b, k], got 1 indices\n"
        '  mask doc[q] == doc[b, k]\n'
        '       ^~~~~~'),
    'arity': (
        'pattern w\nmask window(4, 5)\n',
        "bad.attn:2:6: error: 'window' takes at most 1 argument (2 given)\n"
        '  mask window(4, 5)\n'
        '       ^~~~~~~~~~~~'),
    'builtin_arity': (
        'pattern w\nmask abs(q, k) < 3\n',
        "bad.attn:2:6: error: 'abs' takes 1 argument (2 given)\n"
        '  mask abs(q, k) < 3\n'
        '       ^~~~~~~~~'),
    'unknown_keyword': (
        'pattern n\nlayout grid(y = 8, x = 8)\nmask neighborhood(3, dilatoin = 2)\n',
        "bad.attn:3:22: error: 'neighborhood' has no parameter 'dilatoin' (did you mean 'dilation'?)\n"
        '  mask neighborhood(3, dilatoin = 2)\n'
        '                       ^~~~~~~~~~~~'),
    'mask_int': (
        'pattern m\nmask q + k\n',
        'bad.attn:2:6: error: mask must be a boolean expression, got int\n'
        '  mask q + k\n'
        '       ^~~~~'),
    'and_ints': (
        'pattern m\nmask q & k\n',
        "bad.attn:2:6: error: operands of '&' must be boolean, got int and int\n"
        '  mask q & k\n'
        '       ^~~~~'),
    'bool_order': (
        'pattern m\nmask (q < k) < (k < q)\n',
        "bad.attn:2:6: error: '<' is not defined on booleans (only == and != are)\n"
        '  mask (q < k) < (k < q)\n'
        '       ^~~~~~~~~~~~~~~~~'),
    'ternary': (
        'pattern m\nmask q < (h < 2 ? 4 : true)\n',
        "bad.attn:2:11: error: branches of '?:' have different types: int and bool\n"
        '  mask q < (h < 2 ? 4 : true)\n'
        '            ^~~~~~~~~~~~~~~~'),
    's_outside': (
        'pattern m\nmask s > 0.5\n',
        "bad.attn:2:6: error: 's' (the attention score) can only be used in a score clause\n"
        '  mask s > 0.5\n'
        '       ^'),
    'float_in_mask': (
        'pattern m(t = 0.5)\nmask q * t < k\n',
        'bad.attn:2:6: error: float arithmetic is only allowed in score and output clauses\n'
        '  mask q * t < k\n'
        '       ^~~~~'),
    'div_ints': (
        'pattern m\nmask q / 2 < k\n',
        "bad.attn:2:6: error: '/' is only allowed on floats in score and output clauses; use '//' for integer division\n"
        '  mask q / 2 < k\n'
        '       ^~~~~'),
    'no_value': (
        'pattern p(w)\nmask q - k < w\n',
        "bad.attn:1:11: error: parameter 'w' has no default and no value was given\n"
        '  pattern p(w)\n'
        '            ^'),
    'bad_dim': (
        'pattern d\ninput doc: int[b, z]\nmask causal\n',
        'bad.attn:2:19: error: bad input dimension: expected one of b, h, q, k, q_blocks, k_blocks or a positive integer\n'
        '  input doc: int[b, z]\n'
        '                    ^'),
    'natten_kd': (
        'pattern n(size = 8)\nlayout grid(y = size, x = size)\nmask neighborhood(5, dilation = 2)\n',
        "bad.attn:3:6: error: neighborhood kernel 5 x dilation 2 = 10 exceeds the length 8 of axis 'y'\n"
        '  mask neighborhood(5, dilation = 2)\n'
        '       ^~~~~~~~~~~~~~~~~~~~~~~~~~~~~\n'
        "bad.attn:3:6: error: neighborhood kernel 5 x dilation 2 = 10 exceeds the length 8 of axis 'x'\n"
        '  mask neighborhood(5, dilation = 2)\n'
        '       ^~~~~~~~~~~~~~~~~~~~~~~~~~~~~'),
    'natten_stride': (
        'pattern n\nlayout grid(y = 8, x = 8)\nmask neighborhood((3, 3), stride = (2, 5))\n',
        "bad.attn:3:6: error: neighborhood stride 5 exceeds the kernel size 3 on axis 'x' (NATTEN requires stride <= kernel)\n"
        '  mask neighborhood((3, 3), stride = (2, 5))\n'
        '       ^~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~'),
    'multiple': (
        'pattern m(w = 4)\nmask casual & q - k < widht\nscore s + foo\n',
        "bad.attn:2:6: error: unknown primitive 'casual' (did you mean 'causal'?)\n"
        '  mask casual & q - k < widht\n'
        '       ^~~~~~\n'
        "bad.attn:2:23: error: unknown name 'widht'\n"
        '  mask casual & q - k < widht\n'
        '                        ^~~~~\n'
        "bad.attn:3:11: error: unknown name 'foo'\n"
        '  score s + foo\n'
        '            ^~~'),
    'prelude_misuse': (
        'pattern m\nmask causal\nscore softcap(s, 50) & causal\n',
        "bad.attn:3:7: error: operands of '&' must be boolean, got float and bool\n"
        '  score softcap(s, 50) & causal\n'
        '        ^~~~~~~~~~~~~~~~~~~~~~~'),
    'blocks_bad_input': (
        'pattern m\ninput gate: float[b, h, q, k]\nmask blocks(gate, block = 4, top = 0.5)\n',
        "bad.attn:3:13: error: 'blocks' needs an input declared float[b, h, q_blocks, k_blocks]; 'gate' is float[b, h, q, k]\n"
        '  mask blocks(gate, block = 4, top = 0.5)\n'
        '              ^~~~'),
    'inside_prelude_def': (
        'pattern m\nmask softcap(q, 2) > 1\n',
        "bad.attn:2:6: error: in 'softcap': '/' is only allowed on floats in score and output "
        "clauses; use '//' for integer division\n"
        '  mask softcap(q, 2) > 1\n'
        '       ^~~~~~~~~~~~~'),
    'division_by_zero': (
        'pattern m\nmask q // 0 < 1\n',
        "bad.attn:2:6: error: division by zero\n"
        '  mask q // 0 < 1\n'
        '       ^~~~~~'),
    'bad_override_type': (
        'pattern m(w = 3)\nmask window(w)\n',
        "bad.attn:1:11: error: parameter 'w' must be an int, float or bool, got str\n"
        '  pattern m(w = 3)\n'
        '            ^~~~~'),
}
OVERRIDES = {"bad_override_type": {"w": "x"}}


@pytest.mark.parametrize("name", sorted(CASES))
def test_error_text(name):
    text, expected = CASES[name]
    assert error_text(text, **OVERRIDES.get(name, {})) == expected


def test_unknown_override_parameter():
    assert error_text("pattern w(width = 4)\nmask q - k < width\n", "w.attn", widht=3) == (
        "w.attn:1:1: error: unknown parameter 'widht' (did you mean 'width'?)\n"
        "  pattern w(width = 4)\n"
        "  ^~~~~~~~~~~~~~~~~~~~")


def test_multiple_errors_are_collected():
    with pytest.raises(attncc.SpecError) as e:
        attncc.parse(CASES["multiple"][0], filename="bad.attn")
    assert [d.message for d in e.value.diagnostics] == [
        "unknown primitive 'casual'", "unknown name 'widht'", "unknown name 'foo'"]
    assert [(d.loc.line, d.loc.col) for d in e.value.diagnostics] == [(2, 6), (2, 23), (3, 11)]


def test_errors_in_a_user_def_point_into_the_def():
    text = "pattern m\ndef near(w) = abs(q - k) < w & widht\nmask near(3)\n"
    assert error_text(text) == (
        "bad.attn:2:32: error: unknown name 'widht'\n"
        "  def near(w) = abs(q - k) < w & widht\n"
        "                                 ^~~~~")


def test_recursive_def():
    text = "pattern m\ndef f(x) = f(x) & true\nmask f(1)\n"
    assert "'f' is defined in terms of itself" in error_text(text)


def test_valid_spec_has_no_error():
    p = attncc.parse("pattern ok(w = 3)\nmask causal & q - k < w\n")
    assert p.params == (("w", 3),)
