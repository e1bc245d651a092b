//! fnx links the system libzmq (built with libsodium) through `.cargo/config.toml`, because
//! encrypted manager links need CurveZMQ; a libzmq built without it must fail the build's tests.

#[test]
fn the_linked_libzmq_supports_curve() {
    assert_eq!(
        zmq::has("curve"),
        Some(true),
        "libzmq {:?} was built without CURVE",
        zmq::version()
    );
    let pair = zmq::CurveKeyPair::new().expect("CURVE key pairs can be made");
    assert_eq!(pair.public_key.len(), 32);
}
