;; loop: `_start` spins forever. Used to test epoch/fuel interruption and
;; wall-clock timeouts. No imports.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $spin
      (br $spin))))
