;; A WASI 0.3 (p3) command written by hand in the component-model text format: no toolchain
;; beyond `wasm-tools parse`. Exports the async `wasi:cli/run@0.3.0#run` (async lift with a
;; callback), writes "hello from a p3 command\n" through the p3 `wasi:cli/stdout.write-via-stream`
;; (stream.new / stream.write / waitable-set wait / future.read of the write result), then
;;   - no argument        -> task.return ok      (exit 0)
;;   - argument of digits -> exit-with-code(N)   (exit N, N < 256)
;;   - any other argument -> task.return err     (exit 1)
;; Imports only p3 interfaces: wasi:cli/{types,stdout,exit,environment}@0.3.0.
(component
  (import "wasi:cli/types@0.3.0" (instance $types
    (type $e (enum "io" "illegal-byte-sequence" "pipe"))
    (export "error-code" (type (eq $e)))))
  (alias export $types "error-code" (type $error-code))
  (import "wasi:cli/stdout@0.3.0" (instance $stdout
    (alias outer 1 $error-code (type $ec0))
    (export "error-code" (type $ec (eq $ec0)))
    (type $bytes (stream u8))
    (type $res (result (error $ec)))
    (type $fut (future $res))
    (export "write-via-stream" (func (param "data" $bytes) (result $fut)))))
  (import "wasi:cli/exit@0.3.0" (instance $exit
    (export "exit-with-code" (func (param "status-code" u8)))))
  (import "wasi:cli/environment@0.3.0" (instance $env
    (type $args (list string))
    (export "get-arguments" (func (result $args)))))

  (type $bytes (stream u8))
  (type $res (result (error $error-code)))
  (type $fut (future $res))

  ;; Memory and a bump allocator, instantiated first so the lowerings can use them.
  (core module $Libc
    (memory (export "memory") 1)
    (global $bump (mut i32) (i32.const 4096))
    (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      ;; align up
      (local.set $p (i32.and (i32.add (global.get $bump) (i32.sub (local.get 2) (i32.const 1)))
                             (i32.sub (i32.const 0) (local.get 2))))
      (global.set $bump (i32.add (local.get $p) (local.get 3)))
      (if (i32.gt_u (global.get $bump) (i32.shl (memory.size) (i32.const 16)))
        (then (drop (memory.grow (i32.const 1)))))
      (local.get $p)))
  (core instance $libc (instantiate $Libc))
  (alias core export $libc "memory" (core memory $mem))
  (alias core export $libc "cabi_realloc" (core func $realloc))

  (core func $stream-new (canon stream.new $bytes))
  (core func $stream-write (canon stream.write $bytes async (memory $mem)))
  (core func $stream-drop-w (canon stream.drop-writable $bytes))
  (core func $future-read (canon future.read $fut async (memory $mem)))
  (core func $future-drop-r (canon future.drop-readable $fut))
  (core func $ws-new (canon waitable-set.new))
  (core func $ws-drop (canon waitable-set.drop))
  (core func $join (canon waitable.join))
  (core func $task-return (canon task.return (result (result))))
  (alias export $stdout "write-via-stream" (func $wvs))
  (core func $wvs (canon lower (func $wvs)))
  (alias export $exit "exit-with-code" (func $ewc))
  (core func $ewc (canon lower (func $ewc)))
  (alias export $env "get-arguments" (func $args))
  (core func $args (canon lower (func $args) (memory $mem) (realloc $realloc)))

  (core module $Main
    (import "libc" "memory" (memory 1))
    (import "" "stream.new" (func $stream-new (result i64)))
    (import "" "stream.write" (func $stream-write (param i32 i32 i32) (result i32)))
    (import "" "stream.drop-writable" (func $stream-drop-w (param i32)))
    (import "" "future.read" (func $future-read (param i32 i32) (result i32)))
    (import "" "future.drop-readable" (func $future-drop-r (param i32)))
    (import "" "waitable-set.new" (func $ws-new (result i32)))
    (import "" "waitable-set.drop" (func $ws-drop (param i32)))
    (import "" "waitable.join" (func $join (param i32 i32)))
    (import "" "task.return" (func $task-return (param i32)))
    (import "" "write-via-stream" (func $wvs (param i32) (result i32)))
    (import "" "exit-with-code" (func $ewc (param i32)))
    (import "" "get-arguments" (func $args (param i32)))

    ;; message at 16..40; args retptr at 64; future.read result at 80
    (data (i32.const 16) "hello from a p3 command\n")
    (global $msg-end i32 (i32.const 40))
    (global $off (mut i32) (i32.const 16))   ;; next byte to write
    (global $w (mut i32) (i32.const 0))      ;; writable end of the stdout stream
    (global $fut (mut i32) (i32.const 0))    ;; future<result<_, error-code>> from write-via-stream
    (global $ws (mut i32) (i32.const 0))     ;; waitable set

    ;; Callback codes: EXIT 0, WAIT 2 | set << 4. Async results: BLOCKED = -1, else count << 4 | code.
    (func $wait (param $h i32) (result i32)
      (call $join (local.get $h) (global.get $ws))
      (i32.or (i32.const 2) (i32.shl (global.get $ws) (i32.const 4))))

    ;; Write (the rest of) the message; when all written, drop the writable end and read the future.
    (func $write-more (result i32)
      (local $r i32)
      (loop $again
        (if (i32.lt_u (global.get $off) (global.get $msg-end))
          (then
            (local.set $r (call $stream-write (global.get $w) (global.get $off)
                                              (i32.sub (global.get $msg-end) (global.get $off))))
            (if (i32.eq (local.get $r) (i32.const -1))
              (then (return (call $wait (global.get $w)))))
            (global.set $off (i32.add (global.get $off) (i32.shr_u (local.get $r) (i32.const 4))))
            ;; reader dropped: stop writing
            (if (i32.ne (i32.and (local.get $r) (i32.const 15)) (i32.const 0))
              (then (global.set $off (global.get $msg-end))))
            (br $again))))
      (call $stream-drop-w (global.get $w))
      (local.set $r (call $future-read (global.get $fut) (i32.const 80)))
      (if (i32.eq (local.get $r) (i32.const -1))
        (then (return (call $wait (global.get $fut)))))
      (call $finish))

    ;; Pick the outcome from the arguments.
    (func $finish (result i32)
      (local $list i32) (local $n i32) (local $p i32) (local $len i32) (local $code i32) (local $c i32)
      (call $future-drop-r (global.get $fut))
      (call $ws-drop (global.get $ws))
      (call $args (i32.const 64))
      (local.set $list (i32.load (i32.const 64)))
      (local.set $n (i32.load (i32.const 68)))
      (if (i32.lt_u (local.get $n) (i32.const 2))
        (then (call $task-return (i32.const 0)) (return (i32.const 0))))
      ;; args[1] = (ptr, len) at list + 8
      (local.set $p (i32.load (i32.add (local.get $list) (i32.const 8))))
      (local.set $len (i32.load (i32.add (local.get $list) (i32.const 12))))
      (if (i32.eqz (local.get $len))
        (then (call $task-return (i32.const 1)) (return (i32.const 0))))
      (block $bad
        (loop $digits
          (local.set $c (i32.sub (i32.load8_u (local.get $p)) (i32.const 48)))
          (br_if $bad (i32.gt_u (local.get $c) (i32.const 9)))
          (local.set $code (i32.add (i32.mul (local.get $code) (i32.const 10)) (local.get $c)))
          (local.set $p (i32.add (local.get $p) (i32.const 1)))
          (local.set $len (i32.sub (local.get $len) (i32.const 1)))
          (br_if $digits (local.get $len)))
        (call $ewc (i32.and (local.get $code) (i32.const 255)))
        (unreachable))
      (call $task-return (i32.const 1))
      (i32.const 0))

    (func (export "run") (result i32)
      (local $pair i64)
      (global.set $ws (call $ws-new))
      (local.set $pair (call $stream-new))
      (global.set $w (i32.wrap_i64 (i64.shr_u (local.get $pair) (i64.const 32))))
      (global.set $fut (call $wvs (i32.wrap_i64 (local.get $pair))))
      (call $write-more))

    ;; event: 3 = STREAM_WRITE, 4 = FUTURE_READ
    (func (export "callback") (param $event i32) (param $h i32) (param $payload i32) (result i32)
      (call $join (local.get $h) (i32.const 0))
      (if (i32.eq (local.get $event) (i32.const 3))
        (then
          (global.set $off (i32.add (global.get $off) (i32.shr_u (local.get $payload) (i32.const 4))))
          (if (i32.ne (i32.and (local.get $payload) (i32.const 15)) (i32.const 0))
            (then (global.set $off (global.get $msg-end))))
          (return (call $write-more))))
      (if (i32.eq (local.get $event) (i32.const 4))
        (then (return (call $finish))))
      (unreachable)))

  (core instance $main (instantiate $Main
    (with "libc" (instance $libc))
    (with "" (instance
      (export "stream.new" (func $stream-new))
      (export "stream.write" (func $stream-write))
      (export "stream.drop-writable" (func $stream-drop-w))
      (export "future.read" (func $future-read))
      (export "future.drop-readable" (func $future-drop-r))
      (export "waitable-set.new" (func $ws-new))
      (export "waitable-set.drop" (func $ws-drop))
      (export "waitable.join" (func $join))
      (export "task.return" (func $task-return))
      (export "write-via-stream" (func $wvs))
      (export "exit-with-code" (func $ewc))
      (export "get-arguments" (func $args))))))

  (type $run-type (func async (result (result))))
  (func $run (type $run-type)
    (canon lift (core func $main "run") async (callback (core func $main "callback"))))
  (instance $run-instance (export "run" (func $run)))
  (export "wasi:cli/run@0.3.0" (instance $run-instance))
)
