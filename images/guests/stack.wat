;; stack: unbounded (non-tail) recursion in pure wasm; ends in a stack
;; overflow trap. `$recurse` calls itself with n+1, drops the result and
;; returns its own local, so the call is never in tail position. No imports.
(module
  (memory (export "memory") 1)
  (func $recurse (param $n i32) (result i32)
    (drop (call $recurse (i32.add (local.get $n) (i32.const 1))))
    (local.get $n))
  (func (export "_start")
    (drop (call $recurse (i32.const 0)))))
