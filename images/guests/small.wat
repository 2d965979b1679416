;; small: the smallest useful module, for instantiation benchmarks.
;; Exports `memory` (1 page), `_start` (empty) and `add (i32, i32) -> i32`.
;; No imports.
(module
  (memory (export "memory") 1)
  (func (export "_start"))
  (func (export "add") (param $a i32) (param $b i32) (result i32)
    (i32.add (local.get $a) (local.get $b))))
