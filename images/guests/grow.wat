;; grow: pure-wasm memory bomb. Memory starts at 1 page (64 KiB, no maximum).
;; `_start` repeatedly does `memory.grow 16` (1 MiB) and writes one byte into
;; every new 64 KiB page so the memory is really touched. When memory.grow
;; returns -1 (host refused / limit reached) it executes `unreachable` (trap).
;; Never returns normally. No imports.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (local $old i32)   ;; previous size in pages == first new page
    (local $page i32)  ;; page being touched
    (local $end i32)   ;; one past the last new page
    (loop $grow
      (local.set $old (memory.grow (i32.const 16)))
      (if (i32.eq (local.get $old) (i32.const -1))
        (then unreachable))
      (local.set $page (local.get $old))
      (local.set $end (i32.add (local.get $old) (i32.const 16)))
      (loop $touch
        ;; store8 at page * 65536 (fits in i32: page < 65536)
        (i32.store8
          (i32.shl (local.get $page) (i32.const 16))
          (i32.const 0xAA))
        (local.set $page (i32.add (local.get $page) (i32.const 1)))
        (br_if $touch (i32.lt_u (local.get $page) (local.get $end))))
      (br $grow))))
