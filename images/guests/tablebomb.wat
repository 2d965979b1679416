;; tablebomb: funcref table starting at 1 element (no maximum). `_start`
;; repeatedly does `table.grow` by 10000 null funcrefs until it returns -1
;; (host refused / limit reached), then executes `unreachable` (trap).
;; Never returns normally. No imports.
(module
  (memory (export "memory") 1)
  (table $t 1 funcref)
  (func (export "_start")
    (loop $grow
      (if (i32.eq
            (table.grow $t (ref.null func) (i32.const 10000))
            (i32.const -1))
        (then unreachable))
      (br $grow))))
