// pixelmed's validators for many files in ONE JVM (a JVM start costs 5-40 s on a loaded 2-core machine).
// Usage: java -cp pixelmed.jar PixelmedBatch.java (iod|sr) FILE...; prints "=== FILE" then the report.
import com.pixelmed.dicom.AttributeList;
import com.pixelmed.validate.DicomInstanceValidator;
import com.pixelmed.validate.DicomSRValidator;

public class PixelmedBatch {
    public static void main(String[] args) throws Exception {
        boolean sr = args[0].equals("sr");
        DicomInstanceValidator iod = sr ? null : new DicomInstanceValidator();
        DicomSRValidator srValidator = sr ? new DicomSRValidator() : null;
        for (int i = 1; i < args.length; i++) {
            AttributeList list = new AttributeList();
            list.setDecompressPixelData(false);  // as pixelmed's own command line: the IOD rules read no pixel
            list.read(args[i]);
            System.out.println("=== " + args[i]);
            System.out.println(sr ? srValidator.validate(list) : iod.validate(list));
        }
    }
}
